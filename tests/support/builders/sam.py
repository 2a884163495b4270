"""A tiny segment-anything model with seeded random weights (real segment_anything classes, small sizes)."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import torch


def build_tiny_sam(seed: int = 0):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)  # segment_anything's layers initialise from the global generator
    img, patch, dim = 256, 16, 32
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=64,
            img_size=img,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=(1,),
            window_size=4,
            out_chans=dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(img // patch, img // patch),
            input_image_size=(img, img),
            mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=64, num_heads=8),
            transformer_dim=dim,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    with torch.no_grad():  # rel-pos tables start at zero in segment_anything; give them values too
        for name, p in sam.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0, 0.02)
        make_masks_follow_the_box(sam)
    return sam.eval()


def make_masks_follow_the_box(sam) -> None:
    """Two fixed rescalings that make the random model's masks depend clearly on the box prompt.

    With plain random weights the box corners reach the mask logits only faintly: for some boxes the mask
    differs from the whole-image box's mask in a handful of pixels, so a bug that ignores the boxes could
    slip through. Doubling the prompt encoder's random Fourier frequencies makes the corner embeddings of
    different boxes further apart, and a 4x stronger image->token cross-attention output writes the
    prompt tokens into every pixel feature the masks are read from. The mask logits stay small and centred
    near zero (typically a quarter to a half of the pixels are in a mask), so masks are neither empty nor
    full. tests/unit/test_sam_masks.py checks those properties against segment-anything's own predictor.
    """
    sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(2.0)
    for layer in sam.mask_decoder.transformer.layers:
        layer.cross_attn_image_to_token.out_proj.weight.mul_(4.0)


def save_tiny_sam(path: str | os.PathLike, seed: int = 0) -> str:
    path = os.fspath(path)
    sd = build_tiny_sam(seed).state_dict()
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save(sd, path)
    return path


def textured_image(h: int, w: int, seed: int) -> torch.Tensor:
    """uint8 ``[H, W, 3]``: smooth colour blobs plus noise, so SAM's image embedding varies across the image."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 4, 6, generator=g)
    smooth = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    noisy = (0.8 * smooth + 0.2 * torch.rand(h, w, 3, generator=g)).clamp(0, 1)
    return (noisy * 255).round().to(torch.uint8)


# Batched (our code) and one-box-at-a-time (SamPredictor.predict) decoding may round the last bit of a
# mask logit differently; a pixel may only disagree with the reference where the reference logit is this
# close to SAM's threshold 0. In practice no pixel disagrees (the tests report how many did).
LOGIT_TOLERANCE = 1e-4


def predictor_reference(sam, image_u8, boxes, multimask: bool):
    """segment-anything's own answer, one box at a time: ``(masks [N, H, W] bool, logits [N, H, W], scores [N])``.

    ``SamPredictor.predict(box=..., multimask_output=...)`` for each box alone; with ``multimask`` the
    candidate with the highest predicted IoU is kept, as SAM's examples do.
    """
    import numpy as np
    from segment_anything import SamPredictor

    predictor = SamPredictor(sam)
    predictor.set_image(np.ascontiguousarray(np.asarray(image_u8, dtype=np.uint8)))
    masks, logits, scores = [], [], []
    for box in boxes:
        out, iou, _ = predictor.predict(
            box=np.array(box, dtype=np.float64), multimask_output=multimask, return_logits=True
        )
        best = int(np.argmax(iou))
        logits.append(torch.from_numpy(out[best].copy()))
        masks.append(logits[-1] > sam.mask_threshold)
        scores.append(float(iou[best]))
    return torch.stack(masks), torch.stack(logits), torch.tensor(scores)


def assert_matches_reference(masks, reference, logits, what: str = "mask") -> None:
    """``masks`` (0/1 floats) equal the reference masks, except where the reference logit is within
    LOGIT_TOLERANCE of the threshold."""
    assert masks.shape == reference.shape, (what, masks.shape, reference.shape)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}, f"{what}: not a 0/1 mask"
    for i, (m, ref, lg) in enumerate(zip(masks, reference, logits, strict=True)):
        wrong = m.bool() != ref
        firm = wrong & (lg.abs() > LOGIT_TOLERANCE)
        assert not firm.any(), (
            f"{what} {i + 1}: {int(firm.sum())} of {ref.numel()} pixels differ from SamPredictor's mask for "
            f"that box alone (ours covers {int(m.sum())} px, SamPredictor's {int(ref.sum())} px)"
        )
        assert int(wrong.sum()) <= 0.001 * ref.numel(), f"{what} {i + 1}: {int(wrong.sum())} borderline pixels differ"


def assert_reference_is_telling(reference, full_image_reference, min_fraction: float = 0.02) -> None:
    """The reference masks can catch wrong masks: none empty or whole-image, all different from one another
    and from the whole-image box's mask (so zeros or an ignored box cannot pass a comparison)."""
    n = reference.shape[0]
    pixels = reference[0].numel()
    for i in range(n):
        covered = int(reference[i].sum())
        assert 0.05 * pixels < covered < 0.95 * pixels, f"reference mask {i + 1} covers {covered} of {pixels} px"
        off_full = int((reference[i] != full_image_reference).sum())
        assert off_full > min_fraction * pixels, f"reference mask {i + 1} is nearly the whole-image box's mask"
        for j in range(i + 1, n):
            apart = int((reference[i] != reference[j]).sum())
            assert apart > min_fraction * pixels, f"reference masks {i + 1} and {j + 1} differ in {apart} px only"


# ------------------------------------------------------- one reference scene for the node-level tests

REFERENCE_H, REFERENCE_W = 64, 96
REFERENCE_BOXES = [[4, 6, 44, 60], [40, 2, 92, 34], [30, 24, 80, 62]]
REFERENCE_IMAGE = "mc_sam_reference.png"


def reference_image_u8() -> torch.Tensor:
    return textured_image(REFERENCE_H, REFERENCE_W, seed=11)


def save_reference_image(input_dir) -> torch.Tensor:
    """The reference picture as a PNG in ComfyUI's input folder (LoadImage returns exact k/255 floats)."""
    from PIL import Image

    image = reference_image_u8()
    Image.fromarray(image.numpy()).save(Path(input_dir) / REFERENCE_IMAGE)
    return image


def reference_prompt(sam_name="tiny_sam.pth", multimask=True, via="regions", bboxes=None) -> dict:
    """API prompt: LoadImage -> SAM Masks (no dilation, no feathering, not cut to the box) -> preview.

    ``via``: "regions" (Regions node, px JSON), "bbox_link" (the Regions node's BBOX output) or "value"
    (``bboxes`` typed straight into the prompt; a list is wrapped in ``{"__value__": ...}`` as the frontend
    does, because a bare list means a link)."""
    regions = json.dumps(
        {
            "units": "px",
            "boxes": [
                {"x": x0, "y": y0, "w": x1 - x0, "h": y1 - y0, "label": f"box{i + 1}"}
                for i, (x0, y0, x1, y1) in enumerate(REFERENCE_BOXES)
            ],
        }
    )
    inputs = {"sam": ["1", 0], "image": ["2", 0], "multimask": multimask, "dilation_px": 0, "feather_px": 0}
    inputs["keep_inside_box"] = False
    if via == "regions":
        inputs["regions"] = ["3", 0]
    elif via == "bbox_link":
        inputs["bboxes"] = ["3", 2]
    else:
        inputs["bboxes"] = {"__value__": bboxes} if isinstance(bboxes, list) else bboxes
    return {
        "1": {"class_type": "MultiConceptSAMLoader", "inputs": {"sam_name": sam_name}},
        "2": {"class_type": "LoadImage", "inputs": {"image": REFERENCE_IMAGE}},
        "3": {
            "class_type": "MultiConceptRegions",
            "inputs": {"width": REFERENCE_W, "height": REFERENCE_H, "regions": regions},
        },
        "4": {"class_type": "MultiConceptSAMMasks", "inputs": inputs},
        "5": {"class_type": "MaskToImage", "inputs": {"mask": ["4", 0]}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }
