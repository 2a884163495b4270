"""Where concepts go: boxes with prompts (``layout``), their preview (``preview``), SAM masks (``sam``)."""

from .layout import MAX_REGIONS, PALETTE, Region, RegionError, Regions, box_mask, parse_regions, validate_regions_json

__all__ = [
    "MAX_REGIONS",
    "PALETTE",
    "Region",
    "RegionError",
    "Regions",
    "box_mask",
    "parse_regions",
    "validate_regions_json",
]
