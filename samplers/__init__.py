"""Inference-time machinery: ED-LoRA concepts in CLIP and MODEL, layer-wise context routing.

Maths and token handling (``layerwise_context``, ``concept_tokens``, ``concepts``) are pure torch;
``edlora_clip`` and ``edlora_model`` are the thin ComfyUI glue around them.
"""
