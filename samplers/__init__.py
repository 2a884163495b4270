"""Inference-time machinery, one room per subject:

* ``edlora/``        ED-LoRA concepts: tokens, layer-wise prompt encoding and routing, the loader's glue;
* ``regions/``       where concepts go: region boxes, their preview, SAM masks;
* ``concept_stack/`` the concepts of one picture, read by every composition method;
* ``scoped_lora/``   each concept's LoRA acting only in its region or its own batch rows, in one UNet call.

The maths in each takes tensors, not ComfyUI objects; the ComfyUI glue (``edlora/model.py``,
``edlora/clip.py``, ``scoped_lora/adapters.py``, ``scoped_lora/runtime.py``) wraps it.
"""
