"""ED-LoRA (Mix-of-Show) concepts in ComfyUI: concept words as tokens (``tokens``, ``vocabulary``), a CLIP that
encodes a prompt once per cross-attention layer (``clip``, ``layerwise``), and the MODEL/CLIP glue of the
ED-LoRA Loader (``model``)."""
