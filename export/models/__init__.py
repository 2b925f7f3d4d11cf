"""Model zoo: a DINOv2 backbone (timm) plus one head or adapter set per VPR method."""
from .dinov2 import DinoV2Backbone, interpolate_pos_embed
from .vpr_model import VPRModel

__all__ = ["DinoV2Backbone", "VPRModel", "interpolate_pos_embed"]
