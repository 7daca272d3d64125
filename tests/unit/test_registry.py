"""Registry: names, options, config mapping, pretrained torchvision weights from disk."""

import copy
import dataclasses
import io
from pathlib import Path

import pytest
import torch
import torchvision

from rkan_dist.config import ConfigError, ModelConfig, OptimConfig, field_help, load_config
from rkan_dist.models import MODEL_OPTIONS, build_model, create_model, list_models, model_options_from_config
from rkan_dist.models.registry import (
    convert_sync_batchnorm,
    is_held_in_eval,
    load_pretrained,
    pretrained_path,
)
from rkan_dist.models.rkan import rkan_stages
from rkan_dist.optim import build_optimizer

pytestmark = pytest.mark.unit

BACKBONES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
             "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"] + [
    f"regnet_{kind}_{size}" for kind in "xy" for size in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")
] + ["regnet_y_128gf"]


def test_list_models_is_sorted_complete_and_builds_nothing(monkeypatch):
    built = []
    original_init = torch.nn.Module.__init__
    monkeypatch.setattr(torch.nn.Module, "__init__", lambda self, *a, **k: built.append(self) or original_init(self, *a, **k))
    names = list_models()
    assert built == []
    assert names == sorted(names)
    assert set(names) == set(BACKBONES) | {"rkan_" + name for name in BACKBONES}


def test_unknown_name_and_option_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"did you mean .*rkan_resnet50.*valid: .*regnet_x_16gf"):
        create_model("rkan_resnet5O")
    with pytest.raises(ValueError, match="reduce_factor.*valid: rkan_stages, reduce_factor"):
        create_model("rkan_resnet18", reduce_factr=4)
    with pytest.raises(ValueError, match="need an RKAN model .*rkan_resnet18"):
        create_model("resnet18", degree=4)


def test_defaults_reproduce_rkanet_and_options_reach_the_block():
    default = rkan_stages(create_model("rkan_resnet18"))
    assert list(default) == ["layer4"]
    block = default["layer4"].rkan
    assert block.conv_in.out_channels == 128 and block.kan1.degree == 3 and block.kan2.degree == 2
    assert type(block.aggregate).__name__ == "AdditionAggregation"
    model = create_model("rkan_regnet_x_400mf", num_classes=7, rkan_stages=(3, 4), reduce_factor=4, aggregation="gating",
                         degree=5, n_convs=2, polynomial="legendre", per_channel=True, shortcut=True)
    stages = rkan_stages(model)
    assert list(stages) == ["trunk_output.block3", "trunk_output.block4"]
    block = stages["trunk_output.block4"].rkan
    assert block.conv_in.in_channels == 160 and block.conv_in.out_channels == 40
    assert (block.kan1.degree, block.kan1.n_convs, block.kan1.polynomial, block.kan1.per_channel) == (5, 2, "legendre", True)
    assert block.shortcut is not None and type(block.aggregate).__name__ == "GatingAggregation"
    assert model.fc.out_features == 7


def test_small_input_stem_keeps_resolution():
    resnet = create_model("rkan_resnet18", num_classes=10, small_input=True)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, torch.nn.Identity)
    regnet = create_model("regnet_x_400mf", num_classes=10, small_input=True)
    assert regnet.stem[0].stride == (1, 1)
    features = {}
    resnet.layer4.register_forward_hook(lambda m, i, o: features.__setitem__("layer4", o.shape))
    assert resnet(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert features["layer4"][-2:] == (4, 4)  # 32 px / 8 instead of / 32


def test_model_options_cover_the_config_section():
    config_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(MODEL_OPTIONS) <= config_fields
    assert set(MODEL_OPTIONS) == config_fields - {"name", "num_classes", "pretrained"}
    config = ModelConfig(name="rkan_resnet18", rkan_stages=[2, 4], aggregation="se", degree=4, small_input=True)
    options = model_options_from_config(config)
    assert set(options) == set(MODEL_OPTIONS)
    assert options["rkan_stages"] == (2, 4) and options["aggregation"] == "se" and options["degree"] == 4
    assert model_options_from_config(ModelConfig(name="resnet18", small_input=True)) == {
        "small_input": True, "small_input_variant": "stem", "freeze_backbone": False}
    per_stage = model_options_from_config(ModelConfig(name="rkan_resnet18", rkan_stages=[3, 4], aggregation=["cbam", "se"]))
    assert per_stage["aggregation"] == ("cbam", "se")


def test_build_model_from_a_loaded_config():
    config = load_config(overrides=["model.name=rkan_resnet18", "model.num_classes=10", "model.rkan_stages=[3,4]",
                                    "model.n_convs=2", "model.polynomial=hermite"])
    model = build_model(config.model)
    assert list(rkan_stages(model)) == ["layer3", "layer4"]
    assert model.layer3.rkan.kan1.n_convs == 2 and model.layer4.rkan.kan2.polynomial == "hermite"
    assert model.fc.out_features == 10


def test_pretrained_torchvision_weights_load_into_the_backbone(tmp_path):
    torch.manual_seed(0)
    source = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_model(ModelConfig(name="rkan_resnet18", pretrained=str(path)))
    torch.testing.assert_close(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    torch.testing.assert_close(model.fc.weight, source.fc.weight)
    # another head and the small-input stem keep their new initialisation, the rest loads
    model = build_model(ModelConfig(name="rkan_resnet18", num_classes=10, small_input=True, pretrained=str(path)))
    torch.testing.assert_close(model.layer1[0].bn1.running_var, source.layer1[0].bn1.running_var)
    assert model.fc.weight.shape == (10, 512) and model.conv1.weight.shape == (64, 3, 3, 3)


def test_pretrained_weights_that_do_not_fit_are_refused(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    model = create_model("rkan_resnet18")
    cases = {
        "missing": ({k: v for k, v in state.items() if not k.startswith("layer2.0.conv1")}, "missing .*layer2.0.conv1.weight"),
        "unexpected": ({**state, "layer5.weight": torch.zeros(1)}, "unexpected .*layer5.weight"),
        "shape": (torchvision.models.resnet50().state_dict(), "do not fit this model"),
        "not a state_dict": ({"arch": "resnet18", "epoch": 90}, "expected a state_dict"),
    }
    for case, (content, message) in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.pth"
        torch.save(content, path)
        with pytest.raises(ValueError, match=message):
            load_pretrained(model, path)
    with pytest.raises(ValueError, match="no such file"):
        load_pretrained(model, tmp_path / "absent.pth")


def test_small_input_variants_stem_and_the_authors_stem_and_stage1():
    shapes = {}

    def stage1_output(model):
        first_stage = rkan_stages(model).get("trunk_output.block1", model.trunk_output.block1)
        handle = first_stage.register_forward_hook(lambda m, i, o: shapes.__setitem__("block1", o.shape[-2:]))
        model(torch.randn(2, 3, 32, 32))
        handle.remove()
        return shapes["block1"]

    stem = create_model("rkan_regnet_y_400mf", num_classes=10, small_input=True, rkan_stages=(1, 4))
    authors = create_model("rkan_regnet_y_400mf", num_classes=10, small_input=True, rkan_stages=(1, 4),
                           small_input_variant="stem_and_stage1")
    assert stage1_output(stem) == (16, 16) and stage1_output(authors) == (32, 32)
    first = next(iter(authors.trunk_output.block1))
    assert first.proj[0].stride == (1, 1) and first.f.b[0].stride == (1, 1)
    assert authors.trunk_output.block1.rkan.kan1.stride == 1 and stem.trunk_output.block1.rkan.kan1.stride == 2
    # ResNet's stage 1 already has stride 1: both variants are the same model
    resnets = [create_model("resnet18", small_input=True, small_input_variant=v) for v in ("stem", "stem_and_stage1")]
    assert [str(m) for m in resnets[:1]] == [str(m) for m in resnets[1:]]
    with pytest.raises(ValueError, match="stem, stem_and_stage1"):
        create_model("resnet18", small_input=True, small_input_variant="stage1")


def test_inv_factor_defaults_to_the_authors_4():
    assert ModelConfig().inv_factor == 4
    block = rkan_stages(create_model("rkan_resnet18", inverse_bottleneck=True))["layer4"].rkan
    assert block.conv_in.out_channels == 256 * 4


# ----------------------------------------------------------------------------- freeze_backbone

def test_freeze_backbone_leaves_only_branches_and_classifier_trainable():
    model = create_model("rkan_resnet18", num_classes=10, small_input=True, rkan_stages=(2, 4), freeze_backbone=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("layer2.rkan.", "layer4.rkan.", "fc.")) for n in trainable)
    assert {n for n, _ in model.named_parameters() if ".rkan." in n or n.startswith("fc.")} == set(trainable)
    linear_probe = create_model("resnet18", num_classes=10, freeze_backbone=True)
    assert [n for n, p in linear_probe.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    # the optimizer gets the trainable parameters only
    optimizer = build_optimizer(model, OptimConfig())
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}


def test_frozen_backbone_batchnorm_stays_in_eval_after_train_copy_pickle():
    model = create_model("rkan_resnet18", num_classes=10, small_input=True, freeze_backbone=True)

    def modes(m):
        bns = {n: b for n, b in m.named_modules() if isinstance(b, torch.nn.BatchNorm2d)}
        return ({b.training for n, b in bns.items() if ".rkan." not in n},
                {b.training for n, b in bns.items() if ".rkan." in n})

    model.train()
    assert modes(model) == ({False}, {True}) and model.training and model.layer4.training
    model.eval()
    assert modes(model) == ({False}, {False})
    model.train()
    copied = copy.deepcopy(model).train()
    assert modes(copied) == ({False}, {True}) and copied.bn1.train.args[0] is copied.bn1
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    assert modes(torch.load(buffer, weights_only=False).train()) == ({False}, {True})
    # SyncBatchNorm (CUDA runs with parallel.sync_bn) only for the BatchNorm layers that train
    synced = convert_sync_batchnorm(copy.deepcopy(model))
    assert type(synced.bn1) is torch.nn.BatchNorm2d and is_held_in_eval(synced.layer4[0].bn2)
    assert type(synced.layer4.rkan.norm1) is torch.nn.SyncBatchNorm
    assert type(convert_sync_batchnorm(create_model("resnet18")).bn1) is torch.nn.SyncBatchNorm


def test_a_frozen_step_changes_only_branch_and_classifier():
    torch.manual_seed(0)
    model = create_model("rkan_resnet18", num_classes=10, small_input=True, freeze_backbone=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, OptimConfig(lr=0.1))
    model(torch.randn(4, 3, 16, 16)).logsumexp(1).mean().backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("fc.") or ".rkan." in k for k in changed)
    assert "layer4.rkan.norm1.running_mean" in changed and "layer4.0.bn1.running_mean" not in changed


# ----------------------------------------------------------------------------- pretrained weights names

def test_pretrained_weights_name_loads_from_torchvisions_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected_file = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    # absent: one line naming the exact file to put there (nothing is downloaded)
    with pytest.raises(ValueError) as error:
        build_model(ModelConfig(name="rkan_resnet18", pretrained="IMAGENET1K_V1"))
    message = str(error.value)
    assert "\n" not in message and str(expected_file) in message and "resnet18-f37072fd.pth" in message
    assert message.count("https://download.pytorch.org/models/resnet18-f37072fd.pth") == 1
    # present: loaded from the cache, as torchvision would
    torch.manual_seed(0)
    source = torchvision.models.resnet18()
    expected_file.parent.mkdir(parents=True)
    torch.save(source.state_dict(), expected_file)
    for name in ("IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"):
        model = build_model(ModelConfig(name="rkan_resnet18", num_classes=10, pretrained=name, freeze_backbone=True))
        torch.testing.assert_close(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
        torch.testing.assert_close(model.layer1[0].bn1.running_var, source.layer1[0].bn1.running_var)
        assert model.fc.weight.shape == (10, 512) and not model.layer4[1].conv2.weight.requires_grad
    assert pretrained_path(str(expected_file), "resnet18") == expected_file  # a path stays a path


def test_pretrained_names_are_checked_with_the_config(tmp_path):
    config = load_config(overrides=["model.name=rkan_resnet50", "model.pretrained=IMAGENET1K_V2"])
    assert config.model.pretrained == "IMAGENET1K_V2"  # the file is looked for when the model is built
    with pytest.raises(ConfigError, match="IMAGENET1K_V3.*did you mean IMAGENET1K_V2"):
        load_config(overrides=["model.name=rkan_resnet50", "model.pretrained=IMAGENET1K_V3"])
    with pytest.raises(ConfigError, match="not a weights name of resnet50"):
        load_config(overrides=["model.name=resnet50", "model.pretrained=ResNet18_Weights.IMAGENET1K_V1"])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(overrides=[f"model.pretrained={tmp_path / 'absent.pth'}"])


# ----------------------------------------------------------------------------- the aggregation table

def test_aggregation_table_drives_config_keys_and_readme():
    from rkan_dist.models.rkan import AGGREGATIONS

    help_text = field_help()["model.aggregation"]
    assert help_text.endswith(" | ".join(AGGREGATIONS))
    for name in AGGREGATIONS:
        load_config(overrides=[f"model.aggregation={name}"])
    config = load_config(overrides=["model.rkan_stages=[2,4]", "model.aggregation=[cbam,glu]"])
    assert config.model.aggregation == ["cbam", "glu"]
    with pytest.raises(ConfigError, match="choose one of addition, gating, se, mult_sigmoid"):
        load_config(overrides=["model.aggregation=concat"])
    with pytest.raises(ConfigError, match="lists 1 names for 2 rkan_stages"):
        load_config(overrides=["model.rkan_stages=[2,4]", "model.aggregation=[se]"])
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| RKAN aggregations |"))
    assert all(f"`{name}`" in row for name in AGGREGATIONS), row
