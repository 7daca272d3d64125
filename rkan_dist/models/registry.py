"""Model names -> models: every torchvision ResNet/ResNeXt/Wide ResNet/RegNet, plain or with `rkan_`.

`list_models()` is cheap (it reads torchvision's builder names, builds nothing): the config
checks `model.name` with it. `build_model(model_config)` is what the trainer calls.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from rkan_dist.models.rkan import attach_rkan, find_stages, is_rkan_key
from rkan_dist.names import RKAN_PREFIX, is_weights_name, list_models

log = logging.getLogger(__name__)

BACKBONE_FAMILIES = ("resnet", "resnext", "wide_resnet", "regnet_x_", "regnet_y_")
MODEL_OPTIONS: tuple[str, ...] = (
    "rkan_stages", "reduce_factor", "inverse_bottleneck", "inv_factor", "aggregation", "degree",
    "n_convs", "polynomial", "per_channel", "shortcut", "scaling", "small_input", "small_input_variant",
    "freeze_backbone",
)
# the options that mean something without an RKAN branch (freeze_backbone: only the classifier trains)
BACKBONE_OPTIONS = ("small_input", "small_input_variant", "freeze_backbone")
SMALL_INPUT_VARIANTS = ("stem", "stem_and_stage1")
CLASSIFIER_PREFIX = "fc."  # torchvision's ResNet and RegNet both name their classifier fc


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


def use_small_input_stage1(model: nn.Module) -> None:
    """Stride 1 in the first block of stage 1 too, as the authors' RKAN_RegNet does for 32-64 px
    images (their 'small' dataset size). ResNet's stage 1 has stride 1 already: nothing changes."""
    _, parent, attribute = find_stages(model)[0]
    first_block = next(iter(getattr(parent, attribute)))
    for conv in first_block.modules():
        if isinstance(conv, nn.Conv2d) and conv.stride != (1, 1):
            conv.stride = (1, 1)


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


def hold_in_eval(module: nn.Module) -> None:
    """Keep `module` in eval mode for good: its own train() becomes eval(), so model.train() passes
    it by. A partial rather than a bound method, so that the model still deep-copies and pickles."""
    module.train = functools.partial(_stay_in_eval, module)
    module.eval()


def is_held_in_eval(module: nn.Module) -> bool:
    hold = module.__dict__.get("train")
    return isinstance(hold, functools.partial) and hold.func is _stay_in_eval


def freeze_backbone(model: nn.Module) -> None:
    """Fine-tuning: only the RKAN branches (`*.rkan.*`) and the classifier (`fc.*`) train.

    Every other parameter gets requires_grad=False (so the optimizer and DDP leave it alone, and
    its gradient is never computed), and every BatchNorm outside the branches stays in eval mode
    after model.train(): its running statistics stay those it was loaded with.
    """
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_rkan_key(name) or name.startswith(CLASSIFIER_PREFIX))
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not is_rkan_key(name):
            hold_in_eval(module)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm for every BatchNorm that trains; one held in eval
    (a frozen backbone's) has no batch statistics to synchronise and keeps its class and its hold."""
    if isinstance(module, _BatchNorm) and not is_held_in_eval(module):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in list(module.named_children()):
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            setattr(module, name, converted)
    return module


def create_model(name: str, num_classes: int = 1000, **options) -> nn.Module:
    """A torchvision backbone (randomly initialised), with RKAN branches when `name` starts with rkan_.

    Options (MODEL_OPTIONS): rkan_stages (default (4,)), reduce_factor, inverse_bottleneck,
    inv_factor, aggregation (one name, or one per entry of rkan_stages), degree, n_convs,
    polynomial, per_channel, shortcut, scaling, small_input, small_input_variant, freeze_backbone.
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
    variant = options.pop("small_input_variant", "stem")
    if variant not in SMALL_INPUT_VARIANTS:
        raise ValueError(f"small_input_variant={variant!r} is not supported; choose one of {', '.join(SMALL_INPUT_VARIANTS)}")
    freeze = options.pop("freeze_backbone", False)
    model = torchvision.models.get_model(backbone_name, weights=None, num_classes=num_classes)
    if options.pop("small_input", False):
        use_small_input_stem(model)
        if variant == "stem_and_stage1":
            use_small_input_stage1(model)
    if is_rkan:
        stages = options.pop("rkan_stages", (4,))
        attach_rkan(model, stages=stages, **options)
    if freeze:
        freeze_backbone(model)
    return model


def model_options_from_config(model_config) -> dict:
    """create_model kwargs from a rkan_dist.config.ModelConfig (plain backbones get small_input only)."""
    wanted = MODEL_OPTIONS if model_config.name.startswith(RKAN_PREFIX) else BACKBONE_OPTIONS
    options = {option: getattr(model_config, option) for option in wanted}
    for option in ("rkan_stages", "aggregation"):
        if isinstance(options.get(option), list | tuple):
            options[option] = tuple(options[option])
    return options


def build_model(model_config) -> nn.Module:
    """The model of a config's `model` section, starting from `pretrained` weights when set."""
    model = create_model(model_config.name, model_config.num_classes, **model_options_from_config(model_config))
    if model_config.pretrained:
        load_pretrained(model, pretrained_path(model_config.pretrained, model_config.name))
    return model


def torchvision_weights(pretrained: str, model_name: str):
    """The torchvision weights enum member `pretrained` names for the backbone of `model_name`."""
    backbone = model_name[len(RKAN_PREFIX):] if model_name.startswith(RKAN_PREFIX) else model_name
    enum = torchvision.models.get_model_weights(backbone)
    if "." in pretrained:
        try:
            weights = torchvision.models.get_weight(pretrained)
        except (ValueError, KeyError, AttributeError):
            weights = None
        if weights is None or type(weights) is not enum:
            raise ValueError(f"{pretrained!r} is not a weights name of {backbone}; "
                             f"valid: {', '.join(enum.__members__)}")
        return weights
    if pretrained not in enum.__members__:
        raise _unknown(f"weights name of {backbone} ({enum.__name__})", pretrained, list(enum.__members__))
    return enum[pretrained]


def weights_cache_path(weights) -> Path:
    """Where torch.hub (torchvision's loader) keeps the file of `weights`: <hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def pretrained_path(pretrained: str | Path, model_name: str) -> Path:
    """The file to load: `pretrained` itself when it is a file, else torchvision's cached file of
    the weights enum it names. Nothing is downloaded: a missing cache file is an error naming it."""
    path = Path(pretrained)
    if path.is_file() or not is_weights_name(str(pretrained)):
        return path
    weights = torchvision_weights(str(pretrained), model_name)
    cached = weights_cache_path(weights)
    if not cached.is_file():
        raise ValueError(f"pretrained={str(pretrained)!r}: {type(weights).__name__}.{weights.name} is not in "
                         f"torchvision's cache and nothing is downloaded here; put {weights.url} at {cached}")
    return cached


def _replaced_by_design(key: str) -> bool:
    """Keys whose shape may legitimately differ from ImageNet weights: classifier and small-input stem."""
    return key.startswith(("fc.", "conv1.", "stem."))


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load a torchvision state_dict (or an rkan-dist export) from disk; RKAN keys absent from it stay
    as initialised.

    A classifier or stem whose shape differs (another num_classes, small_input) is skipped and
    logged; any other missing, unexpected or mis-shaped backbone key is an error. Returns the
    skipped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained weights: no such file {str(path)!r}")
    from rkan_dist.manifest import CheckpointError
    from rkan_dist.weights import read_export  # an rkan-dist export starts a run too

    try:
        state, _ = read_export(path)
    except CheckpointError as err:
        raise ValueError(f"pretrained weights: {err}; expected a state_dict (name -> tensor) as torchvision "
                         "saves it, e.g. torch.save(model.state_dict(), path), or an rkan-dist export") from None
    state = dict(state)  # skipped keys are deleted below; the caller's dict stays whole
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
