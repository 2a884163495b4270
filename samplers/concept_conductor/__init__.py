"""Concept Conductor (multipath sampling): the injection, layout-alignment and shape-aware mask maths in pure
torch (``injection``, ``alignment``, ``masks``, ``settings``); the guider and its patches (``guider``) and
building it from a concept stack (``setup``) are the ComfyUI glue."""
