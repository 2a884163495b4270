"""API-format prompts used by the integration, e2e tests and benchmarks."""

from __future__ import annotations


def plain_txt2img(
    ckpt: str,
    positive="a photo of a cat on a sofa",
    negative="blurry",
    seed=7,
    steps=4,
    size=64,
    cfg=5.0,
    prefix="plain",
) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": seed,
                "steps": steps,
                "cfg": cfg,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }


def edlora_txt2img(
    ckpt: str,
    edloras: list[str],
    positive: str,
    negative="blurry",
    seed=7,
    steps=4,
    size=64,
    cfg=5.0,
    strength_unet=0.7,
    strength_text=0.7,
    prefix="edlora",
) -> dict:
    """Checkpoint -> ED-LoRA loader(s) chained -> stock CLIPTextEncode x2 -> stock KSampler -> SaveImage."""
    prompt = plain_txt2img(ckpt, positive, negative, seed, steps, size, cfg, prefix)
    model, clip = ["1", 0], ["1", 1]
    for i, name in enumerate(edloras):
        node = str(10 + i)
        prompt[node] = {
            "class_type": "MultiConceptEDLoRALoader",
            "inputs": {
                "model": model,
                "clip": clip,
                "edlora_name": name,
                "strength_unet": strength_unet,
                "strength_text": strength_text,
            },
        }
        model, clip = [node, 0], [node, 1]
    prompt["2"]["inputs"]["clip"] = clip
    prompt["3"]["inputs"]["clip"] = clip
    prompt["5"]["inputs"]["model"] = model
    return prompt
