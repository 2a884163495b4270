"""OMG's layout store at the real SDXL shapes: the default budget replays every blended step of the official
SDXL run, and a smaller budget says what it cut and what a full replay needs. Meta tensors: shapes and bytes
without the memory."""

from __future__ import annotations

from benchmarks.sdxl_layout import START, STEPS, record_sdxl
from multiconcept.samplers.omg.layout import DEFAULT_BUDGET_MB, LayoutStore


def test_default_budget_replays_every_blended_step_of_the_official_sdxl_run():
    store = record_sdxl(LayoutStore, DEFAULT_BUDGET_MB)
    assert store.stopped_at is None and store.cut_message() is None
    assert {k[0] for k in store.cross} == {float(s) for s in range(START, STEPS)}  # 34 steps, all 70 layers
    assert len(store.cross) == 34 * 70
    assert {k[0] for k in store.self_qk} == {16.0, 17.0, 18.0, 19.0}  # until 40 % of 50: the 60 32x32 layers
    assert len(store.self_qk) == 4 * 60
    cross = (10 * 4096 * 640 + 60 * 1024 * 1280) * 2  # bytes per step, fp16
    self_qk = 60 * 2 * 1024 * 1280 * 2
    assert store.bytes == store.needed == 34 * cross + 4 * self_qk  # 8.4 GB: the figure the help page gives
    assert store.keep_on.type == "meta" and next(iter(store.cross.values())).device.type == "meta"


def test_a_small_budget_keeps_the_first_steps_and_says_what_a_full_replay_needs():
    store = record_sdxl(LayoutStore, 1024)  # the old default: 2 of 34 steps
    assert store.stopped_at == 18 and {k[0] for k in store.cross} == {16.0, 17.0}
    full = record_sdxl(LayoutStore, DEFAULT_BUDGET_MB).needed
    assert store.needed == full and store.bytes < 1024 * 2**20
    message = store.cut_message()
    assert "steps 17..18 of the blended steps 17..50" in message
    assert f"A full replay needs {-(-full // 2**20)} MiB" in message and "layout_memory_mb is 1024" in message
