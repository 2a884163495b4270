"""Concept fusion: Mix-of-Show gradient fusion (one model for several concepts; ``solvers`` and ``moments`` are
pure torch, ``recording`` and ``fuse`` the ComfyUI glue; the file format is ``formats.fused``) and response-weighted
mixing (``response``)."""
