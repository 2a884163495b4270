"""File formats and safe weight reading: the floor every other part of the pack stands on.

* ``weights``: reading any weights file safely (``.safetensors``; ``torch.load(weights_only=True)`` for
  PyTorch files), with errors that name the file and what is wrong; tensor sanity checks.
* ``edlora``: the ED-LoRA file (official Mix-of-Show ``.pth``, our ``.safetensors``): read, validate, write.
* ``convert_edlora``: the command line ``python -m formats.convert_edlora`` (``.pth`` -> ``.safetensors``).
* ``lora``: ordinary LoRA files (kohya, diffusers, peft, LoCon, ...) as a flat, checked ``{key: tensor}``.
* ``fused``: the fused-concepts file written by Fuse Concepts.
* ``open_clip``: open_clip / OpenAI CLIP checkpoints and the config JSON beside them.

Only torch, safetensors and the standard library: nothing here imports ComfyUI or the rest of the pack
(``samplers/``, ``training/``, ``evaluation/``, ``nodes/``); tests/unit/test_import_floors.py checks it.
"""
