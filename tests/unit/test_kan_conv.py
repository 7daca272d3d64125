"""KANConv2d (fused, recompute-in-backward) against a plain unfold implementation of the formula."""

import functools
import itertools
import math

import numpy as np
import pytest
import torch
from kan_reference import power_series, randomized, reference_kan_conv, relative_error

from rkan_dist.models import kan_conv
from rkan_dist.models.kan_conv import POLYNOMIALS, KANConv2d, recurrence_coefficients

pytestmark = pytest.mark.unit


@pytest.fixture(params=["cpu", "grouped", "depthwise"])
def implementation(request, monkeypatch):
    """Run a test on each implementation that runs on CPU tensors, forced by RKAN_KAN_CONV_IMPL
    as a user would (the triton one: tests/integration/test_kan_conv_triton.py)."""
    monkeypatch.setenv(kan_conv.IMPLEMENTATION_ENV, request.param)
    chosen = []
    original = kan_conv.choose_implementation
    monkeypatch.setattr(kan_conv, "choose_implementation", lambda *args: chosen.append(original(*args)) or chosen[-1])
    yield request.param
    assert chosen and set(chosen) == {request.param}, "another implementation ran"


@pytest.mark.parametrize("polynomial", POLYNOMIALS)
@pytest.mark.parametrize("n_convs,stride,per_channel,size", [(1, 1, False, (7, 9)), (2, 2, False, (9, 7)),
                                                            (1, 2, True, (8, 5)), (2, 1, True, (5, 5))])
@pytest.mark.numerics
def test_fused_equals_unfold_reference_forward_and_gradients(polynomial, n_convs, stride, per_channel, size,
                                                             implementation):
    torch.manual_seed(0)
    channels = 3
    conv = randomized(KANConv2d(channels, degree=3, stride=stride, n_convs=n_convs, polynomial=polynomial,
                                per_channel=per_channel))
    x = torch.randn(2, channels, *size, requires_grad=True)
    out = conv(x)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, conv.base_weight, conv.poly_weight, conv.scaler], grad_out)

    params64 = [p.detach().double().requires_grad_() for p in (conv.base_weight, conv.poly_weight, conv.scaler)]
    x64 = x.detach().double().requires_grad_()
    expected = reference_kan_conv(x64, *params64, stride, polynomial, per_channel)
    expected_grads = torch.autograd.grad(expected, [x64, *params64], grad_out.double())

    assert out.shape == expected.shape == (2, channels * n_convs, (size[0] - 1) // stride + 1, (size[1] - 1) // stride + 1)
    assert relative_error(out, expected) <= 1e-5
    for name, grad, expected_grad in zip(("x", "base_weight", "poly_weight", "scaler"), grads, expected_grads):
        assert relative_error(grad, expected_grad) <= 1e-5, name


@pytest.mark.numerics
def test_padding_is_applied_before_tanh():
    # a zero input: every tap, padded or not, sees P_n(tanh 0) = P_n(0); for chebyshev T_2(0) = -1
    conv = KANConv2d(1, degree=2, n_convs=1)
    with torch.no_grad():
        conv.base_weight.zero_()
        conv.poly_weight.zero_()
        conv.poly_weight[0, :, 2] = 1.0
    out = conv(torch.zeros(1, 1, 4, 4))
    torch.testing.assert_close(out, torch.full((1, 1, 4, 4), -9.0))


@pytest.mark.numerics
def test_recurrences_match_textbook_polynomials():
    u = torch.linspace(-1, 1, 11, dtype=torch.float64)
    for polynomial in POLYNOMIALS:
        from rkan_dist.models.kan_conv import polynomial_maps
        maps = polynomial_maps(u, recurrence_coefficients(polynomial, 5))
        for n, values in enumerate(maps, start=1):
            expected = np.polynomial.polynomial.polyval(u.numpy(), power_series(polynomial, n))
            np.testing.assert_allclose(values.numpy(), expected, rtol=1e-12, atol=1e-12, err_msg=f"{polynomial} P_{n}")


def test_parameter_names_shapes_and_init():
    conv = KANConv2d(64, degree=3, n_convs=2)
    shapes = {name: tuple(p.shape) for name, p in conv.named_parameters()}
    assert shapes == {"base_weight": (2, 9), "poly_weight": (2, 9, 4), "scaler": (2, 9)}
    assert torch.equal(conv.scaler, torch.ones(2, 9))
    per_channel = KANConv2d(64, degree=2, per_channel=True)
    shapes = {name: tuple(p.shape) for name, p in per_channel.named_parameters()}
    assert shapes == {"base_weight": (1, 64, 9), "poly_weight": (1, 64, 9, 3), "scaler": (1, 64, 9)}
    big = KANConv2d(8, degree=3, n_convs=8, per_channel=True)  # 576 / 2304 samples: the stds are visible
    assert big.base_weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.15)
    assert big.poly_weight.std().item() == pytest.approx(1 / 6, rel=0.1)


def test_output_is_kernel_major():
    conv = KANConv2d(3, degree=1, n_convs=2)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        conv.base_weight[1].zero_()
        conv.poly_weight[1].zero_()  # kernel 1 outputs exactly zero
    out = conv(x)
    assert out[:, 3:].abs().max().item() == 0.0
    assert out[:, :3].abs().min().item() > 0.0


def test_bad_arguments_name_the_valid_choices():
    with pytest.raises(ValueError, match="chebyshev, legendre, hermite, jacobi"):
        KANConv2d(4, polynomial="fourier")
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        KANConv2d(4, stride=3)
    with pytest.raises(ValueError, match=r"expects \[B, 4, H, W\]"):
        KANConv2d(4)(torch.randn(1, 5, 3, 3))


@pytest.mark.numerics
def test_channels_last_matches_contiguous_and_keeps_the_format(implementation):
    torch.manual_seed(1)
    conv = randomized(KANConv2d(6, degree=3, stride=2, n_convs=2))
    x = torch.randn(2, 6, 9, 9)
    x_cl = x.clone().contiguous(memory_format=torch.channels_last).requires_grad_()
    x_nchw = x.clone().requires_grad_()
    out_cl, out = conv(x_cl), conv(x_nchw)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out)
    out_cl.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(x_cl.grad, x_nchw.grad)


@pytest.mark.numerics
def test_bf16_autocast_is_close_to_fp32_and_gives_fp32_parameter_grads(implementation):
    torch.manual_seed(2)
    conv = KANConv2d(8, degree=3, stride=1)
    x = torch.randn(2, 8, 7, 7, requires_grad=True)
    reference = conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference) < 2e-2
    out.float().sum().backward()
    assert conv.poly_weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    assert torch.isfinite(conv.poly_weight.grad).all()


def test_saves_only_its_input_for_backward():
    conv = KANConv2d(16, degree=3, stride=2)
    x = torch.randn(2, 16, 10, 10).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv(x)
    activation_bytes = sum(t.numel() * t.element_size() for t in saved if t.dim() == 4 and t.shape[0] == 2)
    assert activation_bytes == x.numel() * x.element_size()


@pytest.mark.parametrize("normalization", ["tanh", "none"])
@pytest.mark.numerics
def test_cpu_kernels_match_the_grouped_conv_across_channel_blocks_and_thread_counts(normalization, monkeypatch):
    # 70 channels: one full block of 64 and a partial one; results must not depend on the split
    torch.manual_seed(3)
    conv = randomized(KANConv2d(70, degree=4, stride=2, n_convs=2, normalization=normalization,
                                polynomial="legendre", per_channel=True))
    x = torch.randn(3, 70, 11, 6)

    def run():
        inp = x.clone().requires_grad_()
        out = conv(inp)
        grads = torch.autograd.grad(out, [inp, *conv.parameters()], torch.cos(out))
        return [out, *grads]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = run()
        torch.set_num_threads(2)
        two_threads = run()
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(kan_conv, "_use_cpu_kernels", lambda x: False)
    grouped = run()
    for a, b, c in zip(one_thread, two_threads, grouped):
        assert torch.equal(a, b)  # each task owns its outputs and gradient slots: no race, same sums
        assert relative_error(a, c) <= 1e-5


def test_cpu_kernels_propagate_nan_so_divergence_is_caught():
    conv = KANConv2d(4, degree=3)
    x = torch.randn(1, 4, 6, 6)
    x[0, 1, 2, 3] = float("nan")
    x.requires_grad_()
    out = conv(x)
    assert out[0, 1, 1:4, 2:5].isnan().all() and out.isnan().sum() == 9
    out.sum().backward()
    assert conv.poly_weight.grad.isnan().any() and x.grad.isnan().any()


@pytest.mark.numerics
def test_kernel_tanh_is_within_4e7_of_tanh_everywhere():
    from rkan_dist.models.kan_conv_cpu import _tanh

    x = np.concatenate([np.linspace(-12, 12, 200_001), [0.0, 1e-30, -1e-8, 1e-4, 7.9, 1e4, -np.inf, np.inf]])
    x = x.astype(np.float32)
    approx = np.array([_tanh(v) for v in x], dtype=np.float64)
    assert np.abs(approx - np.tanh(x.astype(np.float64))).max() <= 4e-7
    nonzero = x != 0
    assert (np.abs(approx - np.tanh(x.astype(np.float64)))[nonzero] / np.abs(np.tanh(x[nonzero]))).max() <= 4e-7


def test_flop_counter_counts_the_kan_conv_on_cpu_tensors():
    # FLOP counting runs the grouped convolution, which it can count; on meta and CPU alike
    from torch.utils.flop_counter import FlopCounterMode

    def flops(device):
        conv = KANConv2d(16, degree=3, stride=2).to(device)
        with FlopCounterMode(display=False) as counter:
            conv(torch.randn(2, 16, 14, 14, device=device))
        return counter.get_total_flops()

    assert flops("cpu") == flops("meta") == 2 * 2 * 16 * 7 * 7 * 4 * 9


# ----------------------------------------------------------------------------- float64

@pytest.mark.parametrize("polynomial", POLYNOMIALS)
@pytest.mark.numerics
def test_float64_passes_gradcheck(polynomial):
    """fp64 in is fp64 throughout (tanh, polynomials, backward): finite differences agree to 1e-6."""
    torch.manual_seed(0)
    for stride, n_convs, per_channel in itertools.product((1, 2), (1, 2), (False, True)):
        conv = randomized(KANConv2d(2, degree=3, stride=stride, n_convs=n_convs, polynomial=polynomial,
                                    per_channel=per_channel)).double()
        names = [name for name, _ in conv.named_parameters()]
        x = torch.randn(1, 2, 4, 5, dtype=torch.float64, requires_grad=True)

        def function(x, *parameters, conv=conv, names=names):
            return torch.func.functional_call(conv, dict(zip(names, parameters)), (x,))

        parameters = tuple(p.detach().clone().requires_grad_() for p in conv.parameters())
        assert function(x, *parameters).dtype == torch.float64
        assert torch.autograd.gradcheck(function, (x, *parameters), eps=1e-6, atol=1e-8, rtol=1e-6), \
            (stride, n_convs, per_channel)


@pytest.mark.numerics
def test_float64_equals_the_float64_reference_to_1e12():
    # fp32 inside would leave ~1e-7 here
    torch.manual_seed(4)
    conv = randomized(KANConv2d(3, degree=4, stride=2, n_convs=2, polynomial="jacobi")).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    expected = reference_kan_conv(x, conv.base_weight, conv.poly_weight, conv.scaler, 2, "jacobi", False)
    assert relative_error(conv(x), expected) <= 1e-12


# ----------------------------------------------------------------------------- the op and its dispatcher

def test_the_implementation_variable_is_checked_and_a_forced_one_must_be_able_to_run(monkeypatch):
    conv = KANConv2d(4, degree=2)
    monkeypatch.setenv(kan_conv.IMPLEMENTATION_ENV, "fastest")
    with pytest.raises(ValueError, match="RKAN_KAN_CONV_IMPL='fastest' is not valid; choose one of auto, cpu, triton"):
        conv(torch.randn(1, 4, 5, 5))
    monkeypatch.setenv(kan_conv.IMPLEMENTATION_ENV, "cpu")
    with pytest.raises(RuntimeError, match="RKAN_KAN_CONV_IMPL=cpu: the numba kernels compute in fp32"):
        conv.double()(torch.randn(1, 4, 5, 5, dtype=torch.float64))
    assert {"cpu", "grouped", "depthwise"} <= set(kan_conv.available_implementations("cpu"))
    assert "cpu" not in kan_conv.available_implementations("cpu", torch.float64)
    assert "cpu" not in kan_conv.available_implementations("cuda")


def test_auto_on_cuda_times_each_shape_once_keeps_the_fastest_and_logs_it_once(monkeypatch, caplog):
    # auto's timing and cache, run on CPU tensors by the test hook: depthwise made slow, grouped must win
    import time

    slow = kan_conv.IMPLEMENTATIONS["depthwise"]
    monkeypatch.setitem(kan_conv.IMPLEMENTATIONS, "depthwise", kan_conv.Implementation(
        lambda *args: time.sleep(0.05) or slow.forward(*args), slow.backward))
    monkeypatch.setattr(kan_conv, "CPU_TIMED_CANDIDATES", ("depthwise", "grouped"))
    monkeypatch.setattr(kan_conv, "_CHOICES", {})
    monkeypatch.setattr(kan_conv, "_LOCAL_CHOICES", {})
    timed = []
    original = kan_conv.time_implementations
    monkeypatch.setattr(kan_conv, "time_implementations", lambda *args: timed.append(args) or original(*args))
    conv = KANConv2d(4, degree=2, stride=2)
    weight, bias = (t.detach() for t in conv.grouped_conv_parameters())
    choose = functools.partial(kan_conv._timed_choice, weight=weight, bias=bias, stride=2,
                               coefficients=conv.coefficients, normalization="tanh")
    with caplog.at_level("INFO", logger=kan_conv.__name__):
        assert choose(torch.randn(2, 4, 6, 6)) == choose(torch.randn(2, 4, 6, 6)) == "grouped"
        assert len(timed) == 1 and len(caplog.records) == 1
        assert "stride 2 degree 2: grouped (depthwise" in caplog.records[0].getMessage()
        choose(torch.randn(3, 4, 6, 6))  # another batch size is the same shape
        assert len(timed) == 1
        choose(torch.randn(2, 4, 8, 8))  # another image size is timed anew
    assert len(timed) == 2 and len(kan_conv._CHOICES) == 2


def test_the_choice_key_leaves_out_the_batch_size_only():
    # ranks' last batches differ in size: a key with the batch in it is a new decision on some ranks only
    conv = KANConv2d(4, degree=2, stride=2)
    weight = conv.grouped_conv_parameters()[0].detach()

    def key(x, **kwargs):
        return kan_conv._choice_key(x, weight, **{"stride": 2, "coefficients": conv.coefficients,
                                                  "normalization": "tanh", **kwargs})

    x = torch.randn(2, 4, 6, 6)
    assert key(x) == key(torch.randn(7, 4, 6, 6))
    others = [key(torch.randn(2, 4, 6, 8)), key(x.double()), key(x.contiguous(memory_format=torch.channels_last)),
              key(x, stride=1), key(x, normalization="none"), key(x, coefficients=conv.coefficients[:1])]
    assert len({key(x), *others}) == 1 + len(others)


def test_auto_on_cpu_runs_the_numba_kernels_inside_and_outside_the_training_step():
    conv = KANConv2d(4, degree=2)
    weight, bias = (t.detach() for t in conv.grouped_conv_parameters())

    def choose(x):
        return kan_conv.choose_implementation(x, weight.to(x.dtype), bias.to(x.dtype), 1, conv.coefficients, "tanh")

    x = torch.randn(2, 4, 5, 5)
    outside = choose(x), choose(x.double())
    with kan_conv.shared_choices():
        inside = choose(x), choose(x.double())
    assert outside == inside == ("cpu", "grouped")


@pytest.fixture
def timed_on_cpu(monkeypatch):
    """`auto` times grouped against depthwise on CPU tensors (the test hook), with empty caches;
    yields the list of the shapes it timed."""
    monkeypatch.setattr(kan_conv, "CPU_TIMED_CANDIDATES", ("grouped", "depthwise"))
    monkeypatch.setattr(kan_conv, "_CHOICES", {})
    monkeypatch.setattr(kan_conv, "_LOCAL_CHOICES", {})
    timed = []
    original = kan_conv.time_implementations
    monkeypatch.setattr(kan_conv, "time_implementations",
                        lambda x, *args: timed.append(tuple(x.shape)) or original(x, *args))
    return timed


def test_without_peers_auto_times_outside_the_training_step_but_keeps_those_choices_apart(timed_on_cpu):
    # a decision timed with no peers must not be one a later process group's training step finds
    # on this rank alone: the others would broadcast without it
    conv = KANConv2d(4, degree=2)
    x = torch.randn(2, 4, 6, 6)
    conv(x).sum().backward()
    assert timed_on_cpu == [(2, 4, 6, 6)] and list(kan_conv._LOCAL_CHOICES) and not kan_conv._CHOICES
    with kan_conv.shared_choices():
        conv(torch.randn(3, 4, 6, 6)).sum().backward()
    assert timed_on_cpu == [(2, 4, 6, 6), (3, 4, 6, 6)]
    assert kan_conv._CHOICES.keys() == kan_conv._LOCAL_CHOICES.keys()
    conv(torch.randn(5, 4, 6, 6))  # the training decision serves eval too
    assert len(timed_on_cpu) == 2


def test_a_choice_without_a_collective_reuses_the_nearest_training_decision_of_the_layer():
    conv = KANConv2d(4, degree=2, stride=2)
    weight = conv.grouped_conv_parameters()[0].detach()

    def key(height, width, channels=4, stride=2):
        return kan_conv._choice_key(torch.empty(1, channels, height, width), weight, stride, conv.coefficients, "tanh")

    decided = {key(16, 16): "depthwise", key(24, 24): "triton", key(20, 20, stride=1): "cpu",
               key(8, 8, channels=8): "cpu"}
    assert kan_conv._reused_choice(key(24, 24), decided) == "triton"
    assert kan_conv._reused_choice(key(32, 32), decided) == "triton"  # 1024 px: nearer 576 than 256
    assert kan_conv._reused_choice(key(14, 14), decided) == "depthwise"
    assert kan_conv._reused_choice(key(16, 26), decided) == "depthwise"  # 416 px: a tie goes to the earlier one
    assert kan_conv._reused_choice(key(16, 26), dict(reversed(decided.items()))) == "triton"
    assert kan_conv._reused_choice(key(20, 20, channels=2), decided) == kan_conv.DEFAULT_CHOICE == "grouped"


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_op_passes_torch_library_opcheck(memory_format):
    # schema, fake tensors (their strides too), autograd registration and AOT dispatch: what
    # torch.compile relies on; channels_last as a channels_last model hands weight and x over
    torch.manual_seed(7)
    conv = randomized(KANConv2d(3, degree=2, stride=2, n_convs=2))
    weight, bias = (t.detach() for t in conv.grouped_conv_parameters())
    weight = weight.contiguous(memory_format=memory_format).requires_grad_()
    bias = bias.requires_grad_()
    x = torch.randn(2, 3, 5, 6).contiguous(memory_format=memory_format).requires_grad_()
    coefficients = [v for abc in conv.coefficients for v in abc]
    torch.library.opcheck(torch.ops.rkan_dist.kan_conv.default, (x, weight, bias, 2, coefficients, "tanh"))
    # inductor asserts the fake strides on the real outputs, the backward op's included
    from torch._subclasses.fake_tensor import FakeTensorMode

    grad_out = torch.randn(2, 6, 3, 3).contiguous(memory_format=memory_format)
    args = (grad_out, x.detach(), weight.detach(), 2, coefficients, "tanh")
    real = torch.ops.rkan_dist.kan_conv_backward(*args)
    with FakeTensorMode() as mode:
        fake = torch.ops.rkan_dist.kan_conv_backward(*(mode.from_tensor(a) if torch.is_tensor(a) else a for a in args))
    assert [t.stride() for t in real] == [t.stride() for t in fake]


def test_flop_counter_counts_the_backward_as_twice_the_forward():
    from torch.utils.flop_counter import FlopCounterMode

    conv = KANConv2d(8, degree=3, stride=1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        conv(x).sum().backward()
    forward = 2 * 2 * 8 * 6 * 6 * 4 * 9
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.rkan_dist.kan_conv] == forward
    assert counts[torch.ops.rkan_dist.kan_conv_backward] == 2 * forward
