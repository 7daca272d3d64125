"""Models: torchvision backbones with RKAN branches, by name (see registry.py)."""

from rkan_dist.models.kan_conv import KANConv2d
from rkan_dist.models.registry import (
    MODEL_OPTIONS,
    build_model,
    create_model,
    list_models,
    load_pretrained,
    model_options_from_config,
)
from rkan_dist.models.rkan import RKANBlock, RKANStage, attach_rkan, rkan_stages

__all__ = [
    "MODEL_OPTIONS", "KANConv2d", "RKANBlock", "RKANStage", "attach_rkan", "build_model", "create_model",
    "list_models", "load_pretrained", "model_options_from_config", "rkan_stages",
]
