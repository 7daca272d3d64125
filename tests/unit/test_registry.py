"""Registry: names, options, config mapping, pretrained torchvision weights from disk."""

import dataclasses

import pytest
import torch
import torchvision

from rkan_dist.config import ModelConfig, load_config
from rkan_dist.models import MODEL_OPTIONS, build_model, create_model, list_models, model_options_from_config
from rkan_dist.models.registry import load_pretrained
from rkan_dist.models.rkan import rkan_stages

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
    assert model_options_from_config(ModelConfig(name="resnet18", small_input=True)) == {"small_input": True}


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
        "not a state_dict": ({"model": state}, "expected a state_dict"),
    }
    for case, (content, message) in cases.items():
        path = tmp_path / f"{case.replace(' ', '_')}.pth"
        torch.save(content, path)
        with pytest.raises(ValueError, match=message):
            load_pretrained(model, path)
    with pytest.raises(ValueError, match="no such file"):
        load_pretrained(model, tmp_path / "absent.pth")
