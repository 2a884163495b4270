"""The concept stack: the concepts of one picture, shared by every composition method (DESIGN.md §6)."""

from ...formats.lora import LoRAFile  # the adapter of a kind == "lora" concept
from .stack import Concept, ConceptStack, ConceptStackError

__all__ = ["Concept", "ConceptStack", "ConceptStackError", "LoRAFile"]
