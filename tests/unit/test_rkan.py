"""RKAN block and attachment: parameter counts, FLOPs, activation memory, keys, options, norms."""

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from rkan_dist.models import create_model, rkan_stages
from rkan_dist.models.rkan import RKANBlock, RKANStage, attach_rkan, bottleneck_channels, is_rkan_key

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


@pytest.mark.parametrize("aggregation,extra", [("addition", 0), ("gating", 2048 * 2048 + 2048),
                                               ("se", 2048 * 128 + 128 + 128 * 2048 + 2048)])
def test_aggregations(aggregation, extra):
    block = RKANBlock(1024, 2048, stride=2, last_stage=True, aggregation=aggregation)
    assert count(block) == block_params(1024, 2048) + extra
    x, y = torch.randn(2, 1024, 8, 8), torch.randn(2, 2048, 4, 4)
    r = block.branch(x)
    out = block.aggregate(y, r)
    assert out.shape == y.shape
    if aggregation == "addition":
        torch.testing.assert_close(out, y + r)
    if aggregation == "gating":
        g = torch.sigmoid(block.aggregate.gate(r))
        torch.testing.assert_close(out, y * g + r * (1 - g))


def test_block_variants_inverse_bottleneck_shortcut_per_channel():
    assert bottleneck_channels(1024, reduce_factor=4) == 256
    assert bottleneck_channels(1024, inverse_bottleneck=True, inv_factor=2) == 2048
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
