"""RKAN block and attachment: parameter counts, FLOPs, activation memory, keys, options, norms."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from rkan_dist.models import create_model, rkan_stages
from rkan_dist.models.rkan import (
    AGGREGATIONS,
    RKANBlock,
    RKANStage,
    attach_rkan,
    bottleneck_channels,
    is_rkan_key,
    make_aggregation,
)

pytestmark = pytest.mark.unit


def on_meta(name: str, **options) -> torch.nn.Module:
    """Shapes only, no initialisation or storage: enough for parameter and FLOP counts, and fast.

    torchvision's RegNet computes its widths with tensor ops that need data, so it is built on CPU.
    """
    if "regnet" in name:
        return create_model(name, **options)
    with torch.device("meta"):
        return create_model(name, **options)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def kan_params(degree: int, n_convs: int = 1) -> int:
    return n_convs * (9 + 9 * (degree + 1) + 9)  # base_weight, poly_weight, scaler


def block_params(c_in: int, c_out: int, reduce_factor: int = 2, degree: int = 3, n_convs: int = 1, last: bool = True) -> int:
    """The issue's block-size formula: conv1x1 + KAN + BN + conv1x1 + [KAN degree 2] + BN."""
    mid = c_in // reduce_factor
    return (c_in * mid + kan_params(degree, n_convs) + 2 * mid * n_convs + mid * n_convs * c_out
            + (kan_params(2) if last else 0) + 2 * c_out)


def test_rkan_resnet50_has_the_papers_parameter_count():
    model = on_meta("rkan_resnet50")
    assert count(model) == 27_135_115
    assert count(model.layer4.rkan) == 1_578_083 == block_params(1024, 2048)


# stage-4 (C_in, C_out) from the torchvision architectures
@pytest.mark.parametrize("name,c_in,c_out", [("resnet18", 256, 512), ("resnext50_32x4d", 1024, 2048),
                                             ("wide_resnet50_2", 1024, 2048), ("regnet_x_400mf", 160, 400),
                                             ("regnet_y_400mf", 208, 440)])
def test_block_size_formula_holds_across_families(name, c_in, c_out):
    backbone, model = on_meta(name), on_meta("rkan_" + name)
    assert count(model) - count(backbone) == block_params(c_in, c_out)


def test_several_stages_only_the_last_has_the_second_kan_conv():
    model = on_meta("rkan_resnet50", rkan_stages=(2, 4), degree=4, n_convs=2)
    stages = rkan_stages(model)
    assert list(stages) == ["layer2", "layer4"]
    assert stages["layer2"].rkan.kan2 is None and stages["layer4"].rkan.kan2 is not None
    # layer2: 256 -> 512 channels, stride 2
    assert count(stages["layer2"].rkan) == block_params(256, 512, degree=4, n_convs=2, last=False)
    assert stages["layer2"].rkan.kan1.stride == 2


def test_backbone_keys_stay_torchvisions_and_its_weights_load():
    for name, stage in (("resnet50", "layer4"), ("regnet_y_400mf", "trunk_output.block4")):
        backbone, model = create_model(name), create_model("rkan_" + name)
        keys = set(model.state_dict())
        assert {k for k in keys if not is_rkan_key(k)} == set(backbone.state_dict())
        assert all(k.startswith(stage + ".rkan.") for k in keys if is_rkan_key(k))
        result = model.load_state_dict(backbone.state_dict(), strict=False)
        assert result.unexpected_keys == [] and result.missing_keys and all(map(is_rkan_key, result.missing_keys))
        torch.testing.assert_close(model.state_dict()["fc.weight"], backbone.state_dict()["fc.weight"])


def test_augmented_stage_indexes_like_the_original():
    model = create_model("rkan_resnet50")
    assert isinstance(model.layer4, RKANStage) and isinstance(model.layer4, torch.nn.Sequential)
    assert len(model.layer4) == 3
    assert all(isinstance(block, torchvision.models.resnet.Bottleneck) for block in model.layer4)
    assert isinstance(model.layer4[-1], torchvision.models.resnet.Bottleneck)


def test_flops_overhead_at_224px_is_within_the_papers_range():
    images = torch.randn(1, 3, 224, 224, device="meta")

    def flops(model):
        with FlopCounterMode(display=False) as counter:
            model.eval()(images)
        return counter.get_total_flops()

    ratio = flops(on_meta("rkan_resnet50")) / flops(on_meta("resnet50"))
    assert 1.02 <= ratio <= 1.06


def saved_activation_bytes(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward, parameters excluded."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.train()(images)
    return sum(saved.values())


def test_activation_memory_overhead_is_at_most_five_percent():
    # activation memory is linear in the batch, so batch 1 gives the batch-32 ratio (bench: batch 32)
    torch.manual_seed(0)
    images = torch.randn(1, 3, 224, 224)
    ratio = saved_activation_bytes(create_model("rkan_resnet50"), images) / saved_activation_bytes(
        create_model("resnet50"), images)
    assert 1.0 < ratio <= 1.05


# ----------------------------------------------------------------------------- the authors' counts
# Stage 4 only, from the block formula by hand (block_params above):
#   ResNet-50:     block(1024 -> 2048) = 1024*512 + 54 + 2*512 + 512*2048 + 45 + 2*2048 = 1,578,083
#                  backbone (torchvision resnet50) 25,557,032
#   RegNetY-800MF: block(320 -> 784) = 320*160 + 54 + 2*160 + 160*784 + 45 + 2*784 = 178,627
#                  backbone (torchvision regnet_y_800mf) 6,432,512
# gating adds conv1x1 with bias, C*C + C; se adds squeeze and excite without biases, 2 * C * (C // 16).
AUTHORS_PARAMETER_COUNTS = {
    ("rkan_resnet50", "addition"): 27_135_115,  # 25,557,032 + 1,578,083
    ("rkan_resnet50", "gating"): 31_331_467,  # 27,135,115 + 2048*2048 + 2048 (4,196,352)
    ("rkan_resnet50", "se"): 27_659_403,  # 27,135,115 + 2*2048*128 (524,288)
    ("rkan_regnet_y_800mf", "addition"): 6_611_139,  # 6,432,512 + 178,627
    ("rkan_regnet_y_800mf", "gating"): 7_226_579,  # 6,611,139 + 784*784 + 784 (615,440)
    ("rkan_regnet_y_800mf", "se"): 6_687_971,  # 6,611,139 + 2*784*49 (76,832)
}


def test_the_hand_computed_counts_follow_the_block_formula():
    assert 1024 * 512 + 54 + 2 * 512 + 512 * 2048 + 45 + 2 * 2048 == 1_578_083 == block_params(1024, 2048)
    assert 320 * 160 + 54 + 2 * 160 + 160 * 784 + 45 + 2 * 784 == 178_627 == block_params(320, 784)
    assert 2 * 2048 * (2048 // 16) == 524_288  # the authors' SE at 2048 channels
    for name, backbone, block, channels in (("rkan_resnet50", 25_557_032, 1_578_083, 2048),
                                            ("rkan_regnet_y_800mf", 6_432_512, 178_627, 784)):
        addition = AUTHORS_PARAMETER_COUNTS[name, "addition"]
        assert addition == backbone + block
        assert AUTHORS_PARAMETER_COUNTS[name, "gating"] == addition + channels * channels + channels
        assert AUTHORS_PARAMETER_COUNTS[name, "se"] == addition + 2 * channels * (channels // 16)


@pytest.mark.parametrize("name,aggregation", sorted(AUTHORS_PARAMETER_COUNTS))
def test_parameter_counts_equal_the_authors_code(name, aggregation):
    model = on_meta(name, aggregation=aggregation)
    assert count(model) == AUTHORS_PARAMETER_COUNTS[name, aggregation]
    assert count(on_meta(name.removeprefix("rkan_"))) == (25_557_032 if "resnet" in name else 6_432_512)


# ----------------------------------------------------------------------------- every aggregation
# Each aggregation's formula written out here in float64, independently of rkan.py, and its
# parameter count as a function of the channels C and the stage (cbam's kernel: 7, 7, 5, 3).

def sigmoid(x):
    return 1 / (1 + torch.exp(-x))


def conv1x1(module: torch.nn.Conv2d, x):
    out = torch.einsum("oc,bchw->bohw", module.weight[:, :, 0, 0], x)
    return out if module.bias is None else out + module.bias[None, :, None, None]


def mlp_channel(agg, v):
    return conv1x1(agg.mlp[2], torch.clamp(conv1x1(agg.mlp[0], v), min=0))


def cbam_formula(agg, y, r):
    channel = sigmoid(mlp_channel(agg, r.mean((2, 3), keepdim=True)) + mlp_channel(agg, r.amax((2, 3), keepdim=True)))
    r1 = r * channel
    k = agg.spatial.kernel_size[0]
    spatial = sigmoid(F.conv2d(torch.cat([r1.mean(1, keepdim=True), r1.amax(1, keepdim=True)], 1),
                               agg.spatial.weight, agg.spatial.bias, padding=k // 2))
    return y + r1 * spatial


def attention_formula(agg, y, r):
    scores = conv1x1(agg.score, torch.cat([y, r], 1))
    a = torch.exp(scores) / torch.exp(scores).sum(1, keepdim=True)
    return y * a[:, 0:1] + r * a[:, 1:2]


FORMULAS = {
    "addition": (lambda agg, y, r: y + r, lambda c, k: 0),
    "mult_sigmoid": (lambda agg, y, r: y * (1 + sigmoid(r)), lambda c, k: 0),
    "tanh": (lambda agg, y, r: y + torch.tanh(r) * y, lambda c, k: 0),
    "sigmoid": (lambda agg, y, r: y + sigmoid(r) * y, lambda c, k: 0),
    "relu": (lambda agg, y, r: y + torch.clamp(r, min=0), lambda c, k: 0),
    "exp": (lambda agg, y, r: y * torch.exp(torch.tanh(r)), lambda c, k: 0),
    "sig_tanh": (lambda agg, y, r: y + sigmoid(r) * torch.tanh(r) * y, lambda c, k: 0),
    "gating": (lambda agg, y, r: y * sigmoid(conv1x1(agg.gate, r)) + r * (1 - sigmoid(conv1x1(agg.gate, r))),
               lambda c, k: c * c + c),
    "se": (lambda agg, y, r: y + r * sigmoid(conv1x1(agg.excite, torch.clamp(conv1x1(agg.squeeze, r.mean((2, 3), keepdim=True)), min=0))),
           lambda c, k: 2 * c * (c // 16)),
    "film": (lambda agg, y, r: y * (1 + conv1x1(agg.gamma, r)) + conv1x1(agg.beta, r), lambda c, k: 2 * (c * c + c)),
    "attention": (attention_formula, lambda c, k: 2 * c * 2 + 2),
    "glu": (lambda agg, y, r: y + conv1x1(agg.up, sigmoid(r[:, :r.shape[1] // 2]) * r[:, r.shape[1] // 2:]),
            lambda c, k: (c // 2) * c + c),
    "cbam": (cbam_formula, lambda c, k: c * (c // 16) + c // 16 + (c // 16) * c + c + 2 * k * k + 1),
}


def test_every_aggregation_has_a_formula_here_and_a_one_line_formula_doc():
    assert set(FORMULAS) == set(AGGREGATIONS)
    assert list(AGGREGATIONS)[:3] == ["addition", "gating", "se"]
    for cls in AGGREGATIONS.values():
        assert cls.__doc__ and "\n" not in cls.__doc__.strip() and "=" in cls.__doc__


@pytest.mark.parametrize("stage", [1, 3, 4])
@pytest.mark.parametrize("name", list(AGGREGATIONS))
@pytest.mark.numerics
def test_aggregation_matches_its_formula_in_float64_and_counts_its_parameters(name, stage):
    torch.manual_seed(stage)
    channels = 48
    aggregation = make_aggregation(name, channels, stage).double()
    with torch.no_grad():  # away from the default init (zero-ish biases), so that every term shows
        for parameter in aggregation.parameters():
            parameter.normal_(0, 0.3)
    formula, parameters = FORMULAS[name]
    assert count(aggregation) == parameters(channels, {1: 7, 2: 7, 3: 5, 4: 3}[stage])
    y = torch.randn(2, channels, 5, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, channels, 5, 6, dtype=torch.float64, requires_grad=True)
    out = aggregation(y, r)
    assert out.dtype == torch.float64 and out.shape == y.shape
    torch.testing.assert_close(out, formula(aggregation, y, r), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), [y, r, *aggregation.parameters()])
    expected = torch.autograd.grad(formula(aggregation, y, r).square().sum(), [y, r, *aggregation.parameters()])
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-10)


def test_se_is_the_authors_bias_free_form():
    se = make_aggregation("se", 2048)
    assert se.squeeze.bias is None and se.excite.bias is None
    assert count(se) == 524_288


def test_unknown_aggregation_and_odd_glu_are_refused():
    with pytest.raises(ValueError, match="addition, gating, se, mult_sigmoid, .*cbam"):
        make_aggregation("concat", 8)
    with pytest.raises(ValueError, match="odd"):
        make_aggregation("glu", 7)


@pytest.mark.parametrize("name", list(AGGREGATIONS))
def test_every_aggregation_in_a_model_trains_and_records_the_branch_ratio(name):
    torch.manual_seed(0)
    model = create_model("rkan_resnet18", num_classes=10, small_input=True, rkan_stages=(2, 4), aggregation=name)
    stages = rkan_stages(model)
    for stage in stages.values():
        stage.record_norms = True
    model(torch.randn(2, 3, 16, 16)).logsumexp(1).mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    for stage in stages.values():
        assert type(stage.rkan.aggregate) is AGGREGATIONS[name]
        ratio = float(stage.last_branch_norm) / float(stage.last_stage_norm)
        assert math.isfinite(ratio) and ratio > 0


def test_aggregation_per_stage_and_cbam_kernel_per_stage():
    model = create_model("rkan_resnet18", rkan_stages=(4, 1, 3), aggregation=("cbam", "film", "cbam"))
    stages = rkan_stages(model)
    assert {name: type(s.rkan.aggregate).__name__ for name, s in stages.items()} == {
        "layer1": "FilmAggregation", "layer3": "CbamAggregation", "layer4": "CbamAggregation"}
    assert stages["layer3"].rkan.aggregate.spatial.kernel_size == (5, 5)
    assert stages["layer4"].rkan.aggregate.spatial.kernel_size == (3, 3)
    with pytest.raises(ValueError, match="2 names .* for 3 RKAN stages"):
        create_model("rkan_resnet18", rkan_stages=(4, 1, 3), aggregation=("se", "se"))
    with pytest.raises(ValueError, match="not supported"):
        create_model("rkan_resnet18", rkan_stages=(4, 1), aggregation=("se", "sigmod"))


@pytest.mark.numerics
def test_scaling_multiplies_r_by_a_learnable_scalar_with_any_aggregation():
    torch.manual_seed(0)
    plain = RKANBlock(16, 32, stride=2, last_stage=True, aggregation="tanh").double()
    scaled = RKANBlock(16, 32, stride=2, last_stage=True, aggregation="tanh", scaling=True).double()
    scaled.load_state_dict(plain.state_dict(), strict=False)
    assert count(scaled) == count(plain) + 1 and torch.equal(scaled.scale, torch.ones(1, dtype=torch.float64))
    with torch.no_grad():
        scaled.scale.fill_(2.5)
    x, y = torch.randn(2, 16, 6, 6, dtype=torch.float64), torch.randn(2, 32, 3, 3, dtype=torch.float64)
    r = plain.branch(x)
    torch.testing.assert_close(scaled.branch(x), 2.5 * r)
    out = scaled.aggregate(y, scaled.branch(x))
    torch.testing.assert_close(out, y + torch.tanh(2.5 * r) * y)
    out.sum().backward()
    assert scaled.scale.grad is not None and scaled.scale.grad.abs().item() > 0
    model = create_model("rkan_resnet18", rkan_stages=(3, 4), scaling=True)
    assert [n for n, _ in model.named_parameters() if n.endswith(".scale")] == ["layer3.rkan.scale", "layer4.rkan.scale"]


def test_block_variants_inverse_bottleneck_shortcut_per_channel():
    assert bottleneck_channels(1024, reduce_factor=4) == 256
    assert bottleneck_channels(1024, inverse_bottleneck=True, inv_factor=2) == 2048
    assert bottleneck_channels(1024, inverse_bottleneck=True) == 4096  # the authors' default inv_factor 4
    block = RKANBlock(64, 128, stride=2, last_stage=False, inverse_bottleneck=True, inv_factor=2, shortcut=True,
                      per_channel=True)
    assert block.conv_in.out_channels == 128
    assert block.kan1.poly_weight.shape == (1, 128, 9, 4)
    assert block.shortcut[0].stride == (2, 2)
    assert block.branch(torch.randn(2, 64, 9, 9)).shape == (2, 128, 5, 5)
    with pytest.raises(ValueError, match="addition, gating, se"):
        RKANBlock(64, 128, stride=1, last_stage=False, aggregation="concat")
    with pytest.raises(ValueError, match="leaves no channels"):
        bottleneck_channels(4, reduce_factor=8)


@pytest.mark.numerics
def test_record_norms_stores_fp32_norms_of_branch_and_stage_only_when_asked():
    torch.manual_seed(0)
    model = create_model("rkan_resnet18", num_classes=10, small_input=True)
    stage = rkan_stages(model)["layer4"]
    images = torch.randn(2, 3, 32, 32)
    model(images)
    assert stage.record_norms is False and stage.last_branch_norm is None
    captured = {}
    stage.rkan.norm2.register_forward_hook(lambda m, i, o: captured.__setitem__("r", o))
    stage[-1].register_forward_hook(lambda m, i, o: captured.__setitem__("y", o))
    stage.record_norms = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(images)
    for norm in (stage.last_branch_norm, stage.last_stage_norm):
        assert norm.dim() == 0 and norm.dtype == torch.float32 and not norm.requires_grad
    torch.testing.assert_close(stage.last_branch_norm, captured["r"].float().norm())
    torch.testing.assert_close(stage.last_stage_norm, captured["y"].float().norm())


def test_training_step_uses_every_parameter_in_channels_last_and_bf16():
    torch.manual_seed(0)
    model = create_model("rkan_resnet18", num_classes=10, small_input=True, rkan_stages=(1, 4),
                         aggregation="se", shortcut=True).to(memory_format=torch.channels_last)
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(images).float().logsumexp(1).mean()
    loss.backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert sum(p.grad.abs().sum() for p in model.layer4.rkan.kan2.parameters()) > 0


def test_poly_weights_are_named_for_histograms():
    model = on_meta("rkan_resnet50", rkan_stages=(3, 4))
    names = [name for name, _ in model.named_parameters() if name.endswith("poly_weight")]
    assert names == ["layer3.rkan.kan1.poly_weight", "layer4.rkan.kan1.poly_weight", "layer4.rkan.kan2.poly_weight"]


def test_attach_rkan_rejects_bad_stages_and_unknown_architectures():
    with pytest.raises(ValueError, match="1..4"):
        attach_rkan(torchvision.models.resnet18(), stages=(5,))
    with pytest.raises(ValueError, match="duplicates"):
        attach_rkan(torchvision.models.resnet18(), stages=(4, 4))
    with pytest.raises(ValueError, match="cannot find four stages"):
        attach_rkan(torchvision.models.mobilenet_v3_small())
    with pytest.raises(ValueError, match="already has RKAN"):
        attach_rkan(create_model("rkan_resnet18"))


@pytest.mark.numerics
def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = create_model("rkan_resnet18", num_classes=10, small_input=True, rkan_stages=(3, 4))
    images = torch.randn(2, 3, 32, 32)
    eager_out = model(images)
    eager_out.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    # aot_eager traces forward and the KAN conv's custom backward like inductor does, without the
    # C++ build (tests/integration/test_models_compile.py runs inductor)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(images)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-4)
    for p, grad in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, grad, rtol=1e-3, atol=1e-3)
