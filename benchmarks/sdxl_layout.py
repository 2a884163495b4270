"""OMG's layout store driven at the real SDXL shapes on meta tensors (sizes and bytes without the memory): what the
official SDXL run's replay needs and what a budget keeps. Used by bench_omg.py (the figure) and the unit test."""

from __future__ import annotations

import torch

# SDXL's transformer layers at 1024x1024 (latent 128x128): (replace key, tokens, width). 10 layers at 64x64 and
# 60 at 32x32 (ComfyUI's SDXL config: transformer_depth [0, 0, 2, 2, 10, 10], middle 10, output [0,0,0,2,2,2,10,10,10])
SDXL_1024 = (
    [(("input", b, d), 64 * 64, 640) for b in (4, 5) for d in range(2)]
    + [(("input", b, d), 32 * 32, 1280) for b in (7, 8) for d in range(10)]
    + [(("middle", 0, d), 32 * 32, 1280) for d in range(10)]
    + [(("output", b, d), 32 * 32, 1280) for b in (0, 1, 2) for d in range(10)]
    + [(("output", b, d), 64 * 64, 640) for b in (3, 4, 5) for d in range(2)]
)
# kongzhecn/OMG inference_lora.py: 50 steps; blending from step 16 (0.32 of the steps, our `start` default)
STEPS, START = 50, 16


def record_sdxl(layout_store, budget_mb: int, steps: int = STEPS, start: int = START, dtype=torch.float16):
    """A ``layout_store`` (the LayoutStore class, as the caller imported the pack) after stage 1's recording as
    LayoutPatch makes it (one image), every layer of every step."""
    store = layout_store(start, steps, (128, 128), 0, budget_mb * 2**20, keep_on="meta")
    for step in range(steps):
        for key, tokens, width in SDXL_1024:
            t = torch.empty(1, tokens, width, dtype=dtype, device="meta")
            store.record_cross(float(step), key, t)
            if store.wants_self(float(step), tokens):
                store.record_self(float(step), key, t, t)
    return store
