"""LoRA-Composer attention constraints: losses (``losses``), isolation (``isolation``), re-initialisation
(``reinit``), pure torch; the ComfyUI glue in ``guider``."""
