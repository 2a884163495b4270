"""Scoped LoRA: each concept's adapter unmerged, acting only in its region or its own batch rows, in the one
UNet call of a step. ``lowrank`` and ``locality`` are pure tensor maths; ``adapters`` maps a concept's file
onto a model's layers with ComfyUI's key tables; ``runtime`` installs it all on a ModelPatcher clone."""
