"""Model names -> models: every torchvision ResNet/ResNeXt/Wide ResNet/RegNet, plain or with `rkan_`.

`list_models()` is cheap (it reads torchvision's builder names, builds nothing): the config
checks `model.name` with it. `build_model(model_config)` is what the trainer calls.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from rkan_dist.models.rkan import attach_rkan, is_rkan_key
from rkan_dist.names import RKAN_PREFIX, list_models

log = logging.getLogger(__name__)

BACKBONE_FAMILIES = ("resnet", "resnext", "wide_resnet", "regnet_x_", "regnet_y_")
MODEL_OPTIONS: tuple[str, ...] = (
    "rkan_stages", "reduce_factor", "inverse_bottleneck", "inv_factor", "aggregation", "degree",
    "n_convs", "polynomial", "per_channel", "shortcut", "small_input",
)
BACKBONE_OPTIONS = ("small_input",)  # the only option that means something without an RKAN branch


def backbone_names() -> list[str]:
    """torchvision's builders of the supported families (tests/unit/test_startup.py compares these
    with the static rkan_dist.names.BACKBONES that list_models() and the config check use)."""
    return sorted(name for name in torchvision.models.list_models(module=torchvision.models)
                  if name.startswith(BACKBONE_FAMILIES))


def _unknown(kind: str, value: str, valid: list[str] | tuple[str, ...]) -> ValueError:
    close = difflib.get_close_matches(value, valid, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ValueError(f"unknown {kind} {value!r}{hint}; valid: {', '.join(valid)}")


def use_small_input_stem(model: nn.Module) -> None:
    """A 3x3 stride-1 stem without max-pool, for 32-64 px images (CIFAR, Tiny ImageNet, digits)."""
    if isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool"):  # ResNet family
        stem = model.conv1
        model.conv1 = nn.Conv2d(stem.in_channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif isinstance(getattr(model, "stem", None), nn.Module):  # RegNet: already a 3x3 conv, only its stride
        first_conv = next(m for m in model.stem.modules() if isinstance(m, nn.Conv2d))
        first_conv.stride = (1, 1)
    else:
        raise ValueError(f"small_input: do not know the stem of {type(model).__name__}")


def create_model(name: str, num_classes: int = 1000, **options) -> nn.Module:
    """A torchvision backbone (randomly initialised), with RKAN branches when `name` starts with rkan_.

    Options (MODEL_OPTIONS): rkan_stages (default (4,)), reduce_factor, inverse_bottleneck,
    inv_factor, aggregation, degree, n_convs, polynomial, per_channel, shortcut, small_input.
    """
    names = list_models()
    if name not in names:
        raise _unknown("model name", name, names)
    for option in options:
        if option not in MODEL_OPTIONS:
            raise _unknown("model option", option, MODEL_OPTIONS)
    is_rkan = name.startswith(RKAN_PREFIX)
    backbone_name = name[len(RKAN_PREFIX):] if is_rkan else name
    if not is_rkan:
        misplaced = [option for option in options if option not in BACKBONE_OPTIONS]
        if misplaced:
            raise ValueError(f"options {', '.join(misplaced)} need an RKAN model (rkan_{name}); "
                             f"{name} accepts only {', '.join(BACKBONE_OPTIONS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    model = torchvision.models.get_model(backbone_name, weights=None, num_classes=num_classes)
    if options.pop("small_input", False):
        use_small_input_stem(model)
    if is_rkan:
        stages = options.pop("rkan_stages", (4,))
        attach_rkan(model, stages=stages, **options)
    return model


def model_options_from_config(model_config) -> dict:
    """create_model kwargs from a rkan_dist.config.ModelConfig (plain backbones get small_input only)."""
    wanted = MODEL_OPTIONS if model_config.name.startswith(RKAN_PREFIX) else BACKBONE_OPTIONS
    options = {option: getattr(model_config, option) for option in wanted}
    if "rkan_stages" in options:
        options["rkan_stages"] = tuple(options["rkan_stages"])
    return options


def build_model(model_config) -> nn.Module:
    """The model of a config's `model` section, starting from `pretrained` weights when set."""
    model = create_model(model_config.name, model_config.num_classes, **model_options_from_config(model_config))
    if model_config.pretrained:
        load_pretrained(model, model_config.pretrained)
    return model


def _replaced_by_design(key: str) -> bool:
    """Keys whose shape may legitimately differ from ImageNet weights: classifier and small-input stem."""
    return key.startswith(("fc.", "conv1.", "stem."))


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load a torchvision state_dict from disk into the backbone; RKAN keys stay as initialised.

    A classifier or stem whose shape differs (another num_classes, small_input) is skipped and
    logged; any other missing, unexpected or mis-shaped backbone key is an error. Returns the
    skipped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained weights: no such file {str(path)!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained weights {str(path)!r}: expected a state_dict (name -> tensor) as "
                         "torchvision saves it, e.g. torch.save(model.state_dict(), path)")
    own = model.state_dict()
    skipped, mismatched = [], []
    for key, value in list(state.items()):
        if key in own and own[key].shape != value.shape:
            (skipped if _replaced_by_design(key) else mismatched).append(key)
    if mismatched:
        details = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:5])
        raise ValueError(f"pretrained weights {str(path)!r} do not fit this model: {details}")
    for key in skipped:
        del state[key]
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not is_rkan_key(k) and k not in skipped]
    unexpected = [k for k in result.unexpected_keys if not is_rkan_key(k)]
    if missing or unexpected:
        raise ValueError(f"pretrained weights {str(path)!r} do not match the backbone: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if skipped:
        log.warning("pretrained weights: kept the new initialisation of %s (shape differs)", ", ".join(skipped))
    return skipped
