"""SAM box prompts -> object masks: architecture from state-dict shapes, batched prediction, mask clean-up.

segment-anything glue and pure tensor maths; no ComfyUI imports.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

KNOWN = {  # (embed_dim, depth) -> name, as segment_anything's build_sam defines them
    (768, 12): "vit_b",
    (1024, 24): "vit_l",
    (1280, 32): "vit_h",
}
KNOWN_HEADS = {"vit_b": 12, "vit_l": 16, "vit_h": 16}
DEFAULT_WINDOW = 14


def default_global_indexes(depth: int) -> tuple[int, ...]:
    """build_sam's pattern: the last block of each quarter (vit_b 2,5,8,11; vit_l 5,11,17,23; vit_h 7,15,23,31)."""
    return tuple(sorted({k * depth // 4 - 1 for k in range(1, 5)} - {-1}))


class SamFileError(ValueError):
    """Not a usable segment-anything state dict; the message says what is missing."""


@dataclass(frozen=True)
class SamSpec:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    img_size: int
    window_size: int
    global_attn_indexes: tuple[int, ...]
    out_chans: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    num_multimask_outputs: int
    iou_head_depth: int
    iou_head_hidden_dim: int
    mlp_ratio: float = 4.0
    use_rel_pos: bool = True


def _need(sd: dict, key: str) -> torch.Tensor:
    if key not in sd:
        raise SamFileError(f"not a segment-anything checkpoint: '{key}' is missing")
    return sd[key]


def strip_prefix(sd: dict) -> dict:
    """Accept checkpoints saved with a wrapper prefix (``model.``, ``sam.``, ``module.``)."""
    for prefix in ("model.", "sam.", "module."):
        if any(k.startswith(prefix + "image_encoder.") for k in sd):
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def detect_sam_architecture(sd: dict) -> SamSpec:
    sd = strip_prefix(sd)
    proj = _need(sd, "image_encoder.patch_embed.proj.weight")
    embed_dim, patch = int(proj.shape[0]), int(proj.shape[2])
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))})
    if not blocks:
        raise SamFileError("not a segment-anything checkpoint: the image encoder has no blocks")
    depth = blocks[-1] + 1
    pos = _need(sd, "image_encoder.pos_embed")
    grid = int(pos.shape[1])
    img_size = grid * patch
    name = KNOWN.get((embed_dim, depth), "custom")
    use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_h" in sd
    if use_rel_pos:
        # rel_pos_h is [2 * side - 1, head_dim]: side = grid for global blocks, the window size otherwise.
        num_heads = embed_dim // int(sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
        global_idx, window = [], None
        for i in range(depth):
            rel = _need(sd, f"image_encoder.blocks.{i}.attn.rel_pos_h")
            size = (int(rel.shape[0]) + 1) // 2
            if size == grid:
                global_idx.append(i)
            else:
                window = size
        global_idx = tuple(global_idx)
    else:
        # No shapes tell heads or windows apart: official values, else head_dim 64 and build_sam's spacing.
        _need(sd, "image_encoder.blocks.0.attn.qkv.weight")
        num_heads = KNOWN_HEADS.get(name) or (embed_dim // 64 if embed_dim % 64 == 0 else 1)
        global_idx, window = default_global_indexes(depth), None
    out_chans = int(_need(sd, "image_encoder.neck.0.weight").shape[0])
    mask_in = int(_need(sd, "prompt_encoder.mask_downscaling.3.weight").shape[0])
    dec_layers = {int(m.group(1)) for k in sd if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    mlp_dim = int(_need(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0])
    tokens = int(_need(sd, "mask_decoder.mask_tokens.weight").shape[0])
    iou_layers = {
        int(m.group(1)) for k in sd if (m := re.match(r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.", k))
    }
    iou_hidden = int(_need(sd, "mask_decoder.iou_prediction_head.layers.0.weight").shape[0])
    mlp_ratio = int(_need(sd, "image_encoder.blocks.0.mlp.lin1.weight").shape[0]) / embed_dim
    return SamSpec(
        name=name,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        patch_size=patch,
        img_size=img_size,
        window_size=window or DEFAULT_WINDOW,
        global_attn_indexes=global_idx,
        out_chans=out_chans,
        mask_in_chans=mask_in,
        decoder_depth=len(dec_layers),
        decoder_mlp_dim=mlp_dim,
        num_multimask_outputs=tokens - 1,
        iou_head_depth=len(iou_layers),
        iou_head_hidden_dim=iou_hidden,
        mlp_ratio=mlp_ratio,
        use_rel_pos=use_rel_pos,
    )


def build_sam(spec_or_state_dict):
    """A segment_anything ``Sam``: empty from a ``SamSpec``, or detected and strictly loaded from a state dict."""
    if not isinstance(spec_or_state_dict, SamSpec):
        return load_sam(spec_or_state_dict)[0]
    return _build_empty(spec_or_state_dict)


def _build_empty(spec: SamSpec):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = spec.img_size // spec.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.depth,
            embed_dim=spec.embed_dim,
            img_size=spec.img_size,
            mlp_ratio=spec.mlp_ratio,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=spec.use_rel_pos,
            global_attn_indexes=spec.global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.out_chans,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.out_chans,
            image_embedding_size=(grid, grid),
            input_image_size=(spec.img_size, spec.img_size),
            mask_in_chans=spec.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=spec.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=spec.decoder_depth, embedding_dim=spec.out_chans, mlp_dim=spec.decoder_mlp_dim, num_heads=8
            ),
            transformer_dim=spec.out_chans,
            iou_head_depth=spec.iou_head_depth,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def load_sam(sd: dict):
    """``(Sam module in eval mode, SamSpec)`` from a state dict; strict loading catches wrong files."""
    sd = strip_prefix(sd)
    spec = detect_sam_architecture(sd)
    sam = _build_empty(spec)
    try:
        sam.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise SamFileError(f"the weights do not fit the detected {spec.name} architecture: {str(e)[:300]}") from None
    return sam.eval(), spec


@torch.no_grad()
def masks_for_boxes(sam, image: torch.Tensor, boxes: list, multimask: bool = True):
    """One mask per box for one image.

    ``image`` ``[H, W, 3]`` float in 0..1 (ComfyUI's IMAGE row) or uint8; ``boxes`` ``[[x0, y0, x1, y1], ...]``
    in pixels. Returns ``(masks [N, H, W] float32 in {0, 1}, scores [N])``: one image embedding, one
    batched decoder call for all boxes; with ``multimask`` the candidate with the highest predicted IoU wins.
    """
    from segment_anything import SamPredictor

    image = torch.as_tensor(image)
    h, w = int(image.shape[0]), int(image.shape[1])
    if len(boxes) == 0:
        return torch.zeros(0, h, w), torch.zeros(0)
    if image.dtype != torch.uint8:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    np_image = image[..., :3].cpu().numpy()
    predictor = SamPredictor(sam)
    predictor.set_image(np_image)
    device = next(sam.parameters()).device
    box_t = torch.tensor(boxes, dtype=torch.float32, device=device).reshape(-1, 4)
    box_t = predictor.transform.apply_boxes_torch(box_t, np_image.shape[:2])
    masks, scores, _ = predictor.predict_torch(
        point_coords=None, point_labels=None, boxes=box_t, multimask_output=multimask
    )
    best = scores.argmax(dim=1)
    rows = torch.arange(masks.shape[0], device=masks.device)
    return masks[rows, best].float().cpu(), scores[rows, best].float().cpu()


# ------------------------------------------------------------------------------------- clean-up maths


def dilate(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Grow (px > 0) or shrink (px < 0) a ``[..., H, W]`` mask by ``|px|`` pixels (square neighbourhood)."""
    if px == 0:
        return mask
    k = 2 * abs(px) + 1
    shape = mask.shape
    m = mask.reshape(-1, 1, shape[-2], shape[-1]).float()
    if px > 0:
        out = F.max_pool2d(m, k, stride=1, padding=abs(px))
    else:
        out = 1 - F.max_pool2d(1 - m, k, stride=1, padding=abs(px))
    return out.reshape(shape)


def feather(mask: torch.Tensor, px: int) -> torch.Tensor:
    """Soften edges with a Gaussian of radius ``px`` (sigma = px / 2); values stay in 0..1."""
    if px <= 0:
        return mask
    sigma = px / 2
    x = torch.arange(-px, px + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    shape = mask.shape
    m = mask.reshape(-1, 1, shape[-2], shape[-1]).float()
    m = F.conv2d(F.pad(m, (px, px, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, px, px), mode="replicate"), kernel.view(1, 1, -1, 1))
    return m.clamp(0, 1).reshape(shape)


def keep_inside_box(mask: torch.Tensor, box) -> torch.Tensor:
    """Zero a ``[H, W]`` mask outside the integer pixel rectangle around ``box = (x0, y0, x1, y1)``."""
    h, w = mask.shape[-2:]
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    x1, y1 = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    inside = torch.zeros_like(mask)
    inside[..., y0:y1, x0:x1] = 1
    return mask * inside


def clip_box(box, width: int, height: int) -> tuple[float, float, float, float] | None:
    """``box = (x0, y0, x1, y1)`` pixels clipped to a ``width x height`` image; None if nothing is left inside."""
    x0, y0 = min(max(float(box[0]), 0.0), float(width)), min(max(float(box[1]), 0.0), float(height))
    x1, y1 = min(max(float(box[2]), 0.0), float(width)), min(max(float(box[3]), 0.0), float(height))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1, y1
