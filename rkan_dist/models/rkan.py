"""The RKAN block and `attach_rkan()`: a KAN branch in parallel to chosen backbone stages.

For a stage with input x (C_in channels), output y = stage(x) (C_out, stride s):

    r = BN(KAN2(SiLU(conv1x1(BN(KAN1(SiLU(conv1x1(x))))))))   # KAN2 (degree 2) only on the last stage
    r = (r [+ shortcut(x)]) [* scale]                          # options shortcut and scaling
    out = aggregate(y, r)                                      # one of AGGREGATIONS, per stage

The augmented stage keeps the stage's own children under their own names and adds one child
`rkan`, so a torchvision state_dict still loads (only `*.rkan.*` keys are new).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from rkan_dist.models.kan_conv import KANConv2d

SE_REDUCTION = 16
CBAM_REDUCTION = 16
CBAM_KERNELS = {1: 7, 2: 7, 3: 5, 4: 3}  # the spatial-attention kernel of each stage, as the authors chose
LAST_STAGE_DEGREE = 2


def bottleneck_channels(in_channels: int, reduce_factor: int = 2, inverse_bottleneck: bool = False,
                        inv_factor: int = 4) -> int:
    """C_mid of the block: C_in // reduce_factor, or C_in * inv_factor for the paper's 'L' variants."""
    if reduce_factor < 1 or inv_factor < 1:
        raise ValueError(f"reduce_factor and inv_factor must be >= 1, got {reduce_factor} and {inv_factor}")
    channels = in_channels * inv_factor if inverse_bottleneck else in_channels // reduce_factor
    if channels < 1:
        raise ValueError(f"reduce_factor={reduce_factor} leaves no channels of the stage's {in_channels}")
    return channels


# ---------------------------------------------------------------------------- aggregations
# How the branch output r (C channels) joins the stage output y (C channels). Every aggregation
# is built as cls(channels, stage) and called as aggregate(y, r); the docstring's first line is
# its formula (`rkan-dist config keys` and the README list the names of AGGREGATIONS).


class Aggregation(nn.Module):
    """Base of the aggregations: `channels` of y and r, `stage` 1-4 of the backbone."""

    def __init__(self, channels: int, stage: int = 4):
        super().__init__()

    def forward(self, y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class AdditionAggregation(Aggregation):
    """out = y + r."""

    def forward(self, y, r):
        return y + r


class MultSigmoidAggregation(Aggregation):
    """out = y * (1 + sigmoid(r))."""

    def forward(self, y, r):
        return y * (1 + torch.sigmoid(r))


class TanhAggregation(Aggregation):
    """out = y + tanh(r) * y."""

    def forward(self, y, r):
        return y + torch.tanh(r) * y


class SigmoidAggregation(Aggregation):
    """out = y + sigmoid(r) * y."""

    def forward(self, y, r):
        return y + torch.sigmoid(r) * y


class ReluAggregation(Aggregation):
    """out = y + relu(r)."""

    def forward(self, y, r):
        return y + torch.relu(r)


class ExpAggregation(Aggregation):
    """out = y * exp(tanh(r))."""

    def forward(self, y, r):
        return y * torch.exp(torch.tanh(r))


class SigTanhAggregation(Aggregation):
    """out = y + sigmoid(r) * tanh(r) * y."""

    def forward(self, y, r):
        return y + torch.sigmoid(r) * torch.tanh(r) * y


class GatingAggregation(Aggregation):
    """g = sigmoid(conv1x1(r)); out = y * g + r * (1 - g)."""

    def __init__(self, channels: int, stage: int = 4):
        super().__init__(channels, stage)
        self.gate = nn.Conv2d(channels, channels, kernel_size=1, bias=True)

    def forward(self, y, r):
        g = torch.sigmoid(self.gate(r))
        return y * g + r * (1 - g)


class SqueezeExcitationAggregation(Aggregation):
    """out = y + r * sigmoid(excite(relu(squeeze(avgpool(r))))), bias-free 1x1 convs C -> C/16 -> C."""

    def __init__(self, channels: int, stage: int = 4):
        super().__init__(channels, stage)
        hidden = max(channels // SE_REDUCTION, 1)
        self.squeeze = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.excite = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, y, r):
        weight = torch.sigmoid(self.excite(torch.relu(self.squeeze(r.mean((2, 3), keepdim=True)))))
        return y + r * weight


class FilmAggregation(Aggregation):
    """gamma, beta = conv1x1(r), conv1x1(r); out = y * (1 + gamma) + beta."""

    def __init__(self, channels: int, stage: int = 4):
        super().__init__(channels, stage)
        self.gamma = nn.Conv2d(channels, channels, kernel_size=1, bias=True)
        self.beta = nn.Conv2d(channels, channels, kernel_size=1, bias=True)

    def forward(self, y, r):
        return y * (1 + self.gamma(r)) + self.beta(r)


class AttentionAggregation(Aggregation):
    """a = softmax over 2 of conv1x1([y, r]) (2C -> 2); out = y * a[0] + r * a[1]."""

    def __init__(self, channels: int, stage: int = 4):
        super().__init__(channels, stage)
        self.score = nn.Conv2d(2 * channels, 2, kernel_size=1, bias=True)

    def forward(self, y, r):
        a = torch.softmax(self.score(torch.cat([y, r], dim=1)), dim=1)
        return y * a[:, 0:1] + r * a[:, 1:2]


class GluAggregation(Aggregation):
    """out = y + conv1x1(sigmoid(r[:C/2]) * r[C/2:]), the 1x1 conv C/2 -> C."""

    def __init__(self, channels: int, stage: int = 4):
        super().__init__(channels, stage)
        if channels % 2:
            raise ValueError(f"aggregation 'glu' splits the channels in halves: {channels} is odd")
        self.half = channels // 2
        self.up = nn.Conv2d(self.half, channels, kernel_size=1, bias=True)

    def forward(self, y, r):
        return y + self.up(torch.sigmoid(r[:, :self.half]) * r[:, self.half:])


class CbamAggregation(Aggregation):
    """r' = r * sigmoid(MLP(avgpool r) + MLP(maxpool r)); out = y + r' * sigmoid(conv_kxk([mean_c r', max_c r']))."""

    def __init__(self, channels: int, stage: int = 4):
        super().__init__(channels, stage)
        if stage not in CBAM_KERNELS:
            raise ValueError(f"aggregation 'cbam' needs the stage (1-4) for its kernel size, got {stage}")
        hidden = max(channels // CBAM_REDUCTION, 1)
        # the channel MLP, shared by the avg- and max-pooled r: C -> C/16 -> C with biases
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, kernel_size=1, bias=True), nn.ReLU(),
                                 nn.Conv2d(hidden, channels, kernel_size=1, bias=True))
        kernel = CBAM_KERNELS[stage]
        self.spatial = nn.Conv2d(2, 1, kernel_size=kernel, padding=kernel // 2, bias=True)

    def forward(self, y, r):
        channel = torch.sigmoid(self.mlp(r.mean((2, 3), keepdim=True)) + self.mlp(r.amax((2, 3), keepdim=True)))
        r = r * channel
        pooled = torch.cat([r.mean(1, keepdim=True), r.amax(1, keepdim=True)], dim=1)
        return y + r * torch.sigmoid(self.spatial(pooled))


# The one table of aggregations: config validation, `rkan-dist config keys` and the README read it.
AGGREGATIONS: dict[str, type[Aggregation]] = {
    "addition": AdditionAggregation,
    "gating": GatingAggregation,
    "se": SqueezeExcitationAggregation,
    "mult_sigmoid": MultSigmoidAggregation,
    "tanh": TanhAggregation,
    "sigmoid": SigmoidAggregation,
    "relu": ReluAggregation,
    "exp": ExpAggregation,
    "sig_tanh": SigTanhAggregation,
    "film": FilmAggregation,
    "attention": AttentionAggregation,
    "glu": GluAggregation,
    "cbam": CbamAggregation,
}


def make_aggregation(aggregation: str, channels: int, stage: int = 4) -> nn.Module:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not supported; choose one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[aggregation](channels, stage)


class RKANBlock(nn.Module):
    """The RKAN branch r(x) of one stage plus the aggregation that joins it with y = stage(x).

    `stage` (1-4) is the backbone stage the block sits beside (cbam's kernel size depends on it);
    `scaling` multiplies r by a learnable scalar `scale` (initialised to 1) before the aggregation.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, last_stage: bool,
                 reduce_factor: int = 2, inverse_bottleneck: bool = False, inv_factor: int = 4,
                 aggregation: str = "addition", degree: int = 3, n_convs: int = 1,
                 polynomial: str = "chebyshev", per_channel: bool = False, shortcut: bool = False,
                 scaling: bool = False, stage: int = 4):
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
        self.scale = nn.Parameter(torch.ones(1)) if scaling else None
        self.aggregate = make_aggregation(aggregation, out_channels, stage)
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
        if self.scale is not None:
            r = r * self.scale
        return r


class RKANStage(nn.Sequential):
    """A backbone stage with an RKAN branch: the stage's blocks under their names, plus `rkan`.

    Iterating, indexing and len() see only the backbone blocks, as on the original stage.
    With `record_norms` set, forward stores the fp32 L2 norms of the branch output r (as it
    enters the aggregation, whichever that is) and the stage output y (`last_branch_norm`,
    `last_stage_norm`) for the trainer's logging steps.
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


def stage_aggregations(stages: tuple[int, ...], aggregation: str | Iterable[str]) -> dict[int, str]:
    """Stage -> aggregation name: one name for every stage, or one per entry of `stages`, in its order."""
    names = [aggregation] * len(stages) if isinstance(aggregation, str) else list(aggregation)
    if len(names) != len(stages):
        raise ValueError(f"aggregation lists {len(names)} names ({', '.join(map(str, names))}) for "
                         f"{len(stages)} RKAN stages {stages}: give one name, or one per stage")
    for name in names:
        if name not in AGGREGATIONS:
            raise ValueError(f"aggregation={name!r} is not supported; choose one of {', '.join(AGGREGATIONS)}")
    return dict(zip(stages, names))


def attach_rkan(backbone: nn.Module, stages: Iterable[int] = (4,), **block_options) -> nn.Module:
    """Add an RKAN branch in parallel to each chosen stage (1-4) of a torchvision backbone, in place.

    `aggregation` may be one name or a sequence with one name per entry of `stages` (same order).
    """
    stages = tuple(stages)
    for stage in stages:
        if stage not in (1, 2, 3, 4):
            raise ValueError(f"RKAN stages must be in 1..4, got {stage}")
    if len(set(stages)) != len(stages):
        raise ValueError(f"RKAN stages have duplicates: {stages}")
    aggregations = stage_aggregations(stages, block_options.pop("aggregation", "addition"))
    found = find_stages(backbone)
    if any(isinstance(getattr(parent, attribute), RKANStage) for _, parent, attribute in found):
        raise ValueError("this backbone already has RKAN branches")
    shapes = stage_shapes(backbone, found)
    for stage in sorted(stages):
        _, parent, attribute = found[stage - 1]
        in_channels, out_channels, stride = shapes[stage - 1]
        block = RKANBlock(in_channels, out_channels, stride, last_stage=stage == len(found),
                          aggregation=aggregations[stage], stage=stage, **block_options)
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


class BranchTelemetry:
    """The RKAN branches' health for the trainer's logs: ||branch output|| / ||stage output|| per
    augmented stage, and the KAN convolutions' polynomial coefficients for histograms."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.stages = rkan_stages(model)

    def record_norms(self, enabled: bool) -> None:
        """Norms cost a reduction per stage, so the stages record them only on logging steps."""
        for stage in self.stages.values():
            stage.record_norms = enabled

    def branch_ratios(self) -> dict[str, float]:
        """Per augmented stage, from the last forward that recorded norms."""
        ratios = {}
        for name, stage in self.stages.items():
            branch, output = getattr(stage, "last_branch_norm", None), getattr(stage, "last_stage_norm", None)
            if branch is not None and output is not None:
                ratios[f"rkan/{name}/branch_ratio"] = float(branch) / max(float(output), 1e-12)
        return ratios

    def poly_weights(self) -> dict[str, nn.Parameter]:
        """TensorBoard tag -> the KAN convolutions' polynomial coefficients."""
        return {f"rkan/{name}": parameter for name, parameter in self.model.named_parameters()
                if name.endswith("poly_weight")}


def is_rkan_key(key: str) -> bool:
    """Whether a state_dict key belongs to an RKAN branch (and so is absent from torchvision weights)."""
    return "rkan" in key.split(".")
