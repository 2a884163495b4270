"""Every model the tests and benchmarks build, from seeded random weights (nothing is ever downloaded).

* ``sd15``: the tiny SD1.5 checkpoint ComfyUI's stock loader detects (``build_tiny_sd15``), narrower
  SD1.5-shaped UNets (``build_small_sd15_model``), SD1.5's UNet at full width (``build_full_sd15_model``);
* ``sdxl``: small SDXL-shaped UNets (``build_tiny_sdxl``, optionally with all 70 cross-attention layers),
  SDXL's UNet at full width (``build_full_sdxl_model``), SDXL conds (``sdxl_conds``);
* ``clip``: ComfyUI's SD1.5 / SDXL text encoders at any depth (``build_tiny_clip``);
* ``lora``: kohya-named LoRA files for a model (``make_lora``, ``transformer_linears``);
* ``edlora``: ED-LoRA files in the official Mix-of-Show / Concept Conductor SDXL layouts (``official_edlora``);
* ``controlnet``: a ControlNet for the tiny checkpoint; ``sam``: a tiny segment-anything model;
  ``open_clip``: a tiny open_clip model (open_clip or OpenAI layout);
* ``seeded``: the one fill rule of the UNet builders (``fill_seeded``).

The same seed gives the same tensors. Builders that need ComfyUI's classes import ComfyUI lazily, so the
module imports without it.
"""
