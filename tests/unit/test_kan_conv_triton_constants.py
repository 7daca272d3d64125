"""The Triton KAN conv's per-family constants live on the device once: a backward builds no tensor
from host data after the first (on CUDA that would be a blocking copy per layer and step). The
kernels themselves are replaced by no-ops here; tests/integration/test_kan_conv_triton.py runs
them under Triton's interpreter."""

from __future__ import annotations

import importlib

import pytest
import torch

from rkan_dist.models import kan_conv

pytest.importorskip("triton")
pytestmark = pytest.mark.unit


@pytest.fixture
def triton_module():
    module = importlib.import_module("rkan_dist.models.kan_conv_triton")
    module._recurrences.cache_clear()
    module._features_of_zero.cache_clear()
    return module


def constants(polynomial: str, degree: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(coefficients, border) as the dispatcher hands them to kan_conv_triton."""
    coefficients = kan_conv.recurrence_coefficients(polynomial, degree)
    border = tuple(float(v) for v in kan_conv._recurrence_tables(coefficients)[1])
    return kan_conv._flat(coefficients), border


def test_the_constants_are_made_once_per_device_and_family(triton_module):
    cpu = torch.device("cpu")
    coefficients, border = constants("chebyshev", 3)
    recurrences, zero_features = triton_module._recurrences(coefficients, cpu), triton_module._features_of_zero(
        border, cpu)
    again = constants("chebyshev", 3)  # equal tuples built anew, as every call builds them
    assert triton_module._recurrences(again[0], cpu) is recurrences
    assert triton_module._features_of_zero(again[1], cpu) is zero_features
    assert zero_features.tolist() == pytest.approx(border) and zero_features.dtype == torch.float32
    other_coefficients, other_border = constants("legendre", 3)  # another family: its own constants
    assert not torch.equal(triton_module._features_of_zero(other_border, cpu), zero_features)
    assert triton_module._recurrences(constants("chebyshev", 4)[0], cpu) is not recurrences  # another degree


def test_a_second_backward_builds_no_tensor_from_host_data(triton_module, monkeypatch):
    """torch.tensor (a host-to-device copy on CUDA) runs in the first backward only."""
    monkeypatch.setattr(triton_module, "check_device", lambda *args: None)  # CPU tensors without the interpreter
    monkeypatch.setattr(triton_module, "_launch", lambda *args, **meta: None)  # the kernels are not what is tested
    built = []
    original = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *args, **kwargs: built.append(args) or original(*args, **kwargs))
    coefficients, border = constants("hermite", 2)
    channels, n_convs = 4, 2
    x = torch.randn(2, channels, 5, 5)
    weight = torch.randn(channels * n_convs, 3, 3, 3)
    grad_out = torch.randn(2, channels * n_convs, 5, 5)

    def backward():
        return triton_module.backward(grad_out, x, weight, 1, coefficients, True, border)

    grad_x, grad_weight, grad_bias = backward()
    assert len(built) == 2  # the recurrences and the features of 0, once each
    assert (grad_x.shape, grad_weight.shape, grad_bias.shape) == (x.shape, weight.shape, (channels * n_convs,))
    built.clear()
    backward()
    assert built == []
