"""rkan-dist: train RKAN-augmented ResNets and RegNets on ImageNet across GPUs and Slurm nodes.

Notebook use::

    from rkan_dist import create_model, load_config, load_model, Trainer
    config = load_config("configs/demo.yaml", ["train.max_steps=100"])
    Trainer(config).train()
    model = load_model("model.pt")  # an `rkan-dist export` (or a step-N checkpoint folder), in eval mode
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# Imported on first use so that `rkan-dist config show` and `--help` stay quick.
_LAZY = {
    "create_model": "rkan_dist.models",
    "list_models": "rkan_dist.names",  # a static table: no torch import
    "load_config": "rkan_dist.config",
    "Config": "rkan_dist.config",
    "Trainer": "rkan_dist.trainer",
    "load_model": "rkan_dist.export",
    "Interrupted": "rkan_dist.faults",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rkan_dist' has no attribute {name!r}")
