"""ED-LoRA training and file formats (pure torch; usable without ComfyUI)."""
