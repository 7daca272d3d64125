"""The names a config is checked against, without importing torch or torchvision.

`rkan-dist train` and `config show` validate a recipe in well under a second, before any heavy
import; the tables they need live here as plain tuples. tests/unit/test_startup.py keeps them equal
to what torchvision and rkan_dist.models actually define.
"""

from __future__ import annotations

import re

RKAN_PREFIX = "rkan_"

# torchvision.models.list_models() filtered to the families the registry supports (ResNet, ResNeXt,
# Wide ResNet, RegNet X/Y), as of torchvision 0.21+.
BACKBONES: tuple[str, ...] = (
    "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf", "regnet_x_400mf", "regnet_x_800mf",
    "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf", "regnet_y_32gf", "regnet_y_3_2gf",
    "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101", "resnet152", "resnet18", "resnet34",
    "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d", "wide_resnet101_2", "wide_resnet50_2",
)

# The keys of rkan_dist.models.rkan.AGGREGATIONS, in its order.
AGGREGATIONS: tuple[str, ...] = (
    "addition", "gating", "se", "mult_sigmoid", "tanh", "sigmoid", "relu", "exp", "sig_tanh", "film",
    "attention", "glu", "cbam",
)

_WEIGHTS_NAME = re.compile(r"([A-Za-z0-9_]+_Weights\.)?[A-Z][A-Z0-9_]*")


def list_models() -> list[str]:
    """Every name create_model accepts, sorted: each backbone, plain and with the rkan_ prefix."""
    return sorted([*BACKBONES, *(RKAN_PREFIX + name for name in BACKBONES)])


def is_weights_name(pretrained: str) -> bool:
    """Whether `pretrained` reads as a torchvision weights enum name (IMAGENET1K_V2, DEFAULT,
    ResNet50_Weights.IMAGENET1K_V2) rather than a path."""
    return bool(_WEIGHTS_NAME.fullmatch(pretrained))
