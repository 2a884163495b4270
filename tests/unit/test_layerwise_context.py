"""Layer-wise context routing on small tensors (DESIGN §4, ED-LoRA: layer i reads slice i)."""

import copy

import torch

from multiconcept.samplers.edlora.layerwise import LayerwiseContext, LayerwiseTable, layer_for, route_layer_context


def _ctx(rows, tokens, dim=4, seed=0):
    return torch.randn(rows, tokens, dim, generator=torch.Generator().manual_seed(seed))


def test_only_rows_of_layerwise_conds_change_and_each_layer_gets_its_slice():
    rows = 2  # latent batch of 2
    context = _ctx(2 * rows, 6)  # chunk 0 = negative, chunk 1 = concept prompt
    layers = torch.randn(1, 16, 6, 4)
    for layer in range(16):
        out = route_layer_context(context, [None, layers], layer)
        assert torch.equal(out[:rows], context[:rows])  # negative rows untouched
        for r in range(rows, 2 * rows):
            assert torch.equal(out[r], layers[0, layer])
        assert torch.equal(context, _ctx(2 * rows, 6))  # input not modified in place


def test_repetition_padding_is_respected():
    context = _ctx(2, 12)  # the concept prompt (6 tokens) was padded to 12 by repetition
    layers = torch.randn(1, 16, 6, 4)
    out = route_layer_context(context, [layers, None], 3)
    assert torch.equal(out[0], torch.cat([layers[0, 3], layers[0, 3]]))
    assert torch.equal(out[1], context[1])


def test_nothing_to_route_returns_the_same_tensor():
    context = _ctx(2, 6)
    assert route_layer_context(context, [None, None], 0) is context
    assert route_layer_context(context, [], 0) is context
    assert route_layer_context(context, [None, torch.randn(1, 16, 6, 4)], 16) is context  # outside 0..15
    assert route_layer_context(context, [None, torch.randn(1, 16, 6, 4)], None) is context


def test_single_token_concepts_use_the_same_context_everywhere():
    assert layer_for(7, 1) == 0 and layer_for(7, 16) == 7 and layer_for(16, 16) is None
    context = _ctx(2, 6)
    one = torch.randn(1, 1, 6, 4)
    assert torch.equal(route_layer_context(context, [None, one], 11)[1], one[0, 0])


def test_aligned_to_recognises_reference_copies_and_concatenation():
    layers, ref = torch.randn(1, 16, 6, 4), torch.randn(1, 6, 4)
    lw = LayerwiseContext(layers=layers, reference=ref)
    assert lw.aligned_to(ref) is layers
    assert lw.aligned_to(ref.clone()) is layers
    tail = torch.randn(1, 3, 4)
    cat = lw.aligned_to(torch.cat([ref, tail], dim=1))
    assert cat.shape == (1, 16, 9, 4)
    assert torch.equal(cat[:, :, :6], layers) and torch.equal(cat[0, 5, 6:], tail[0])
    assert lw.aligned_to(ref * 0.5) is None  # averaged / changed conditioning is not ours
    assert lw.aligned_to(torch.zeros(1, 3, 4)) is None
    assert lw.aligned_to(None) is None


def test_table_casts_once_per_run_and_survives_deepcopy():
    layers = torch.randn(1, 16, 6, 4)
    table = LayerwiseTable({"u": layers})
    a = table.get("u", torch.device("cpu"), torch.float16)
    assert a.dtype == torch.float16 and table.get("u", torch.device("cpu"), torch.float16) is a
    assert table.get("other", torch.device("cpu"), torch.float32) is None
    assert copy.deepcopy(table) is table and bool(table) and len(table) == 1


def _attn2_patch_call(value_is_context: bool, index: int):
    """Call the pack's attn2 patch the way ComfyUI's BasicTransformerBlock does (value starts as context)."""
    from multiconcept.samplers.edlora.model import TABLE_KEY, LayerwiseContextPatch

    context = _ctx(2, 6, seed=1)  # chunk 0: the concept prompt (uuid "pos"), chunk 1: the negative
    layers = torch.randn(1, 16, 6, 4, generator=torch.Generator().manual_seed(2))
    value = context if value_is_context else context.clone()
    extra = {TABLE_KEY: LayerwiseTable({"pos": layers}), "uuids": ["pos", "neg"], "transformer_index": index}
    n = torch.zeros(1)
    out_n, out_context, out_value = LayerwiseContextPatch()(n, context, value, extra)
    return out_n is n, context, layers, out_context, out_value


def test_attn2_patch_routes_key_and_value_context_of_every_layer():
    """Mix-of-Show: layer i's key AND value projections read layer i's encoding (concept rows only)."""
    for value_is_context in (True, False):  # value as ComfyUI starts it, or as an earlier patch left it
        for index in range(16):
            same_n, context, layers, k_in, v_in = _attn2_patch_call(value_is_context, index)
            assert same_n
            for name, routed in (("context (to_k)", k_in), ("value (to_v)", v_in)):
                assert torch.equal(routed[0], layers[0, index]), f"{name}, layer {index}"
                assert torch.equal(routed[1], context[1]), f"{name}, layer {index}: negative rows changed"
            assert torch.equal(context, _ctx(2, 6, seed=1))  # nothing modified in place


def test_attn2_patch_with_an_sdxl_order_uses_the_layer_index_not_the_transformer_index():
    """SDXL: spatial transformers hold 2 or 10 blocks, so ``transformer_index`` (one per spatial transformer)
    is not the layer; the patch takes the layer from ``(block, number, block_index)`` through the order."""
    from multiconcept.samplers.edlora.layerwise import cross_attention_order
    from multiconcept.samplers.edlora.model import TABLE_KEY, LayerwiseContextPatch

    class Attn2(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_k = torch.nn.Linear(4, 4)

    unet = torch.nn.Module()  # SDXL's attn2 module paths, in forward order
    depths = {("input", n): 2 for n in (4, 5)} | {("input", n): 10 for n in (7, 8)}
    depths |= {("middle", 0): 10} | {("output", n): 10 for n in (0, 1, 2)} | {("output", n): 2 for n in (3, 4, 5)}
    paths = []
    for (block, number), depth in depths.items():
        head = "middle_block" if block == "middle" else f"{block}_blocks.{number}"
        paths += [(f"{head}.1.transformer_blocks.{d}.attn2", (block, number, d)) for d in range(depth)]
    for path, _ in paths:
        parent = unet
        for part in path.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module("attn2", Attn2())
    order = cross_attention_order(unet)
    assert len(order) == 70 and [order[key] for _, key in paths] == list(range(70))

    layers = torch.randn(1, 70, 6, 4, generator=torch.Generator().manual_seed(3))
    patch = LayerwiseContextPatch(order)
    for i, (_, (block, number, depth)) in enumerate(paths):
        context = _ctx(2, 6, seed=1)
        extra = {
            TABLE_KEY: LayerwiseTable({"pos": layers}),
            "uuids": ["pos", "neg"],
            "block": (block, number),
            "block_index": depth,
            "transformer_index": 0,  # deliberately wrong: must not be used when the order knows the layer
        }
        _, k_in, v_in = patch(torch.zeros(1), context, context, extra)
        assert torch.equal(k_in[0], layers[0, i]) and torch.equal(v_in[0], layers[0, i]), f"layer {i}"
        assert torch.equal(k_in[1], context[1])
