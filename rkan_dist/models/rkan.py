"""The RKAN block and `attach_rkan()`: a KAN branch in parallel to chosen backbone stages.

For a stage with input x (C_in channels), output y = stage(x) (C_out, stride s):

    r = BN(KAN2(SiLU(conv1x1(BN(KAN1(SiLU(conv1x1(x))))))))   # KAN2 (degree 2) only on the last stage
    out = aggregate(y, r [+ shortcut(x)])

The augmented stage keeps the stage's own children under their own names and adds one child
`rkan`, so a torchvision state_dict still loads (only `*.rkan.*` keys are new).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torchvision.ops import SqueezeExcitation

from rkan_dist.models.kan_conv import KANConv2d

AGGREGATIONS = ("addition", "gating", "se")
SE_REDUCTION = 16
LAST_STAGE_DEGREE = 2


def bottleneck_channels(in_channels: int, reduce_factor: int = 2, inverse_bottleneck: bool = False,
                        inv_factor: int = 2) -> int:
    """C_mid of the block: C_in // reduce_factor, or C_in * inv_factor for the paper's 'L' variants."""
    if reduce_factor < 1 or inv_factor < 1:
        raise ValueError(f"reduce_factor and inv_factor must be >= 1, got {reduce_factor} and {inv_factor}")
    channels = in_channels * inv_factor if inverse_bottleneck else in_channels // reduce_factor
    if channels < 1:
        raise ValueError(f"reduce_factor={reduce_factor} leaves no channels of the stage's {in_channels}")
    return channels


class GatingAggregation(nn.Module):
    """g = sigmoid(conv1x1(r)); out = y * g + r * (1 - g)."""

    def __init__(self, channels: int):
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, kernel_size=1, bias=True)

    def forward(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(r))
        return y * g + r * (1 - g)


class SqueezeExcitationAggregation(nn.Module):
    """out = y + r * SE(r), SE with reduction 16."""

    def __init__(self, channels: int):
        super().__init__()
        self.se = SqueezeExcitation(channels, max(channels // SE_REDUCTION, 1))

    def forward(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return y + self.se(r)


class AdditionAggregation(nn.Module):
    def forward(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return y + r


def make_aggregation(aggregation: str, channels: int) -> nn.Module:
    if aggregation == "addition":
        return AdditionAggregation()
    if aggregation == "gating":
        return GatingAggregation(channels)
    if aggregation == "se":
        return SqueezeExcitationAggregation(channels)
    raise ValueError(f"aggregation={aggregation!r} is not supported; choose one of {', '.join(AGGREGATIONS)}")


class RKANBlock(nn.Module):
    """The RKAN branch r(x) of one stage plus the aggregation that joins it with y = stage(x)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, last_stage: bool,
                 reduce_factor: int = 2, inverse_bottleneck: bool = False, inv_factor: int = 2,
                 aggregation: str = "addition", degree: int = 3, n_convs: int = 1,
                 polynomial: str = "chebyshev", per_channel: bool = False, shortcut: bool = False):
        super().__init__()
        mid = bottleneck_channels(in_channels, reduce_factor, inverse_bottleneck, inv_factor)
        self.conv_in = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.act_in = nn.SiLU()
        self.kan1 = KANConv2d(mid, degree=degree, stride=stride, n_convs=n_convs, polynomial=polynomial,
                              per_channel=per_channel)
        self.norm1 = nn.BatchNorm2d(mid * n_convs)
        self.conv_out = nn.Conv2d(mid * n_convs, out_channels, kernel_size=1, bias=False)
        self.act_out = nn.SiLU()
        # the reference adds the second KAN conv only on the network's last stage
        self.kan2 = (KANConv2d(out_channels, degree=LAST_STAGE_DEGREE, stride=1, polynomial=polynomial,
                               per_channel=per_channel) if last_stage else None)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.shortcut = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(out_channels)) if shortcut else None)
        self.aggregate = make_aggregation(aggregation, out_channels)
        for conv in (self.conv_in, self.conv_out):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        r = self.norm1(self.kan1(self.act_in(self.conv_in(x))))
        r = self.act_out(self.conv_out(r))
        if self.kan2 is not None:
            r = self.kan2(r)
        r = self.norm2(r)
        if self.shortcut is not None:
            r = r + self.shortcut(x)
        return r


class RKANStage(nn.Sequential):
    """A backbone stage with an RKAN branch: the stage's blocks under their names, plus `rkan`.

    Iterating, indexing and len() see only the backbone blocks, as on the original stage.
    With `record_norms` set, forward stores the fp32 L2 norms of the branch output r and the
    stage output y (`last_branch_norm`, `last_stage_norm`) for the trainer's logging steps.
    """

    def __init__(self, stage: nn.Module, rkan: RKANBlock):
        super().__init__()
        names = []
        for name, block in stage.named_children():
            self.add_module(name, block)
            names.append(name)
        if "rkan" in names:
            raise ValueError("this stage already has an RKAN branch")
        self.block_names = tuple(names)
        self.rkan = rkan
        self.record_norms = False
        self.last_branch_norm: torch.Tensor | None = None
        self.last_stage_norm: torch.Tensor | None = None

    def blocks(self) -> list[nn.Module]:
        return [self._modules[name] for name in self.block_names]

    def __iter__(self):
        return iter(self.blocks())

    def __len__(self) -> int:
        return len(self.block_names)

    def __getitem__(self, index):
        return nn.Sequential(*self.blocks())[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for name in self.block_names:
            y = getattr(self, name)(y)
        r = self.rkan.branch(x)
        if self.record_norms:
            self.last_branch_norm = r.detach().float().norm()
            self.last_stage_norm = y.detach().float().norm()
        return self.rkan.aggregate(y, r)


def find_stages(backbone: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The four stages as (qualified name, parent module, attribute), found by structure.

    ResNet / ResNeXt / Wide ResNet keep them as layer1..layer4; RegNet as the four children of
    trunk_output. Anything else is refused rather than guessed.
    """
    if all(isinstance(getattr(backbone, f"layer{i}", None), nn.Module) for i in range(1, 5)):
        return [(f"layer{i}", backbone, f"layer{i}") for i in range(1, 5)]
    trunk = getattr(backbone, "trunk_output", None)
    if isinstance(trunk, nn.Sequential) and len(trunk) == 4:
        return [(f"trunk_output.{name}", trunk, name) for name, _ in trunk.named_children()]
    raise ValueError(f"cannot find four stages in {type(backbone).__name__}: attach_rkan supports torchvision "
                     "ResNet/ResNeXt/Wide ResNet (layer1..layer4) and RegNet (trunk_output with four stages)")


def stage_shapes(backbone: nn.Module, stages: list[tuple[str, nn.Module, str]], image_size: int = 64,
                 ) -> list[tuple[int, int, int]]:
    """(in_channels, out_channels, stride) of each stage, from a tiny dry run in eval mode."""
    shapes: list[tuple[int, int, int]] = []

    def record(module, inputs, output):
        x = inputs[0]
        shapes.append((x.shape[1], output.shape[1], x.shape[-1] // output.shape[-1]))

    parameter = next(backbone.parameters())
    hooks = [getattr(parent, attribute).register_forward_hook(record) for _, parent, attribute in stages]
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, 3, image_size, image_size, device=parameter.device, dtype=parameter.dtype))
    finally:
        backbone.train(was_training)
        for hook in hooks:
            hook.remove()
    return shapes


def attach_rkan(backbone: nn.Module, stages: Iterable[int] = (4,), **block_options) -> nn.Module:
    """Add an RKAN branch in parallel to each chosen stage (1-4) of a torchvision backbone, in place."""
    stages = tuple(stages)
    for stage in stages:
        if stage not in (1, 2, 3, 4):
            raise ValueError(f"RKAN stages must be in 1..4, got {stage}")
    if len(set(stages)) != len(stages):
        raise ValueError(f"RKAN stages have duplicates: {stages}")
    found = find_stages(backbone)
    if any(isinstance(getattr(parent, attribute), RKANStage) for _, parent, attribute in found):
        raise ValueError("this backbone already has RKAN branches")
    shapes = stage_shapes(backbone, found)
    for stage in sorted(stages):
        _, parent, attribute = found[stage - 1]
        in_channels, out_channels, stride = shapes[stage - 1]
        block = RKANBlock(in_channels, out_channels, stride, last_stage=stage == len(found), **block_options)
        parameter = next(backbone.parameters())
        block.to(device=parameter.device, dtype=parameter.dtype)
        setattr(parent, attribute, RKANStage(getattr(parent, attribute), block))
    return backbone


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def rkan_stages(model: nn.Module) -> dict[str, RKANStage]:
    """Qualified stage name (e.g. 'layer4', 'trunk_output.block4') -> the augmented stage."""
    return {name: module for name, module in unwrap(model).named_modules() if isinstance(module, RKANStage)}


def is_rkan_key(key: str) -> bool:
    """Whether a state_dict key belongs to an RKAN branch (and so is absent from torchvision weights)."""
    return "rkan" in key.split(".")
