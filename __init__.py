"""Multi-concept personalization for ComfyUI.

ComfyUI imports this package from ``custom_nodes/`` and calls :func:`comfy_entrypoint`.
Nothing ComfyUI-specific is imported at module level, so the pure-torch parts of the pack
(``formats/``, ``samplers/``, ``training/``) can be imported and unit-tested without a ComfyUI checkout.
"""

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]


async def comfy_entrypoint():
    from .nodes import MultiConceptExtension

    return MultiConceptExtension()
