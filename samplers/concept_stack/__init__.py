"""The concept stack: the concepts of one picture, shared by every composition method (DESIGN.md §6)."""

from .files import LoRAFile, read_lora_file
from .stack import Concept, ConceptStack, ConceptStackError

__all__ = ["Concept", "ConceptStack", "ConceptStackError", "LoRAFile", "read_lora_file"]
