"""The fused Triton KAN convolution on CPU under Triton's interpreter, against the unfold reference
(the other implementations: tests/unit/test_kan_conv.py); and what each CUDA implementation
writes to memory, counted op by op under a dispatch mode."""

import gc
import importlib
import os
import sys
from collections import Counter

import pytest
import torch
from kan_reference import randomized, reference_kan_conv, relative_error
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from rkan_dist.models import kan_conv
from rkan_dist.models.kan_conv import POLYNOMIALS, KANConv2d

pytest.importorskip("triton")
# the interpreter runs a kernel op by op in Python: ~1 s per case, ~40 s of CPU for the file
pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def no_collection_inside_triton_parsing():
    """Collect first, then keep the cyclic collector off while a test runs: the interpreter ast.parses
    each kernel on first launch, and a collection inside that parse which runs a failing finalizer
    (FFCV's numba dispatchers from earlier tests raise KeyError in theirs) has pytest format the
    traceback, which parses again; CPython 3.11 then fails the outer parse with "AST constructor
    recursion depth mismatch" (one interpreter-wide counter). That failed CI once, in the first case."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _load_triton_kernels(interpret: bool):
    """(Re)import kan_conv_triton with TRITON_INTERPRET set or not: Triton decides at import time
    (when @triton.jit runs) whether a kernel is interpreted."""
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    name = "rkan_dist.models.kan_conv_triton"
    return importlib.reload(sys.modules[name]) if name in sys.modules else importlib.import_module(name)


@pytest.fixture(scope="module")
def interpreted():
    previous = os.environ.get("TRITON_INTERPRET")
    module = _load_triton_kernels(interpret=True)
    assert module.INTERPRETED
    yield module
    _load_triton_kernels(interpret=previous == "1")  # later tests get the kernels the environment asked for


def run_conv(conv, x, implementation, monkeypatch):
    """Output and gradients (x, base_weight, poly_weight, scaler) of `conv` with `implementation` forced."""
    monkeypatch.setenv(kan_conv.IMPLEMENTATION_ENV, implementation)
    chosen = []
    original = kan_conv.choose_implementation
    monkeypatch.setattr(kan_conv, "choose_implementation", lambda *args: chosen.append(original(*args)) or chosen[-1])
    x = x.detach().requires_grad_()
    out = conv(x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    grads = torch.autograd.grad(out, [x, conv.base_weight, conv.poly_weight, conv.scaler], grad_out)
    assert chosen == [implementation, implementation]  # forward and backward ran it, nothing else
    return out, grads, grad_out


def reference(conv, x, grad_out, polynomial):
    params = [p.detach().double().requires_grad_() for p in (conv.base_weight, conv.poly_weight, conv.scaler)]
    x64 = x.detach().double().requires_grad_()
    expected = reference_kan_conv(x64, *params, conv.stride, polynomial, conv.per_channel)
    return expected, torch.autograd.grad(expected, [x64, *params], grad_out.double())


# Every specialisation the kernels are compiled for (degree, stride, n_convs are constexprs) is run;
# the family, per-channel weights and odd/even sizes only change the data and rotate over the cases
# so that each degree meets every family, both weight layouts and both size parities.
CASES = [(degree, stride, n_convs) for degree in (1, 2, 3, 4) for stride in (1, 2) for n_convs in (1, 2)]


def case_options(degree, stride, n_convs):
    offset = 2 * (stride - 1) + (n_convs - 1)
    polynomial = POLYNOMIALS[(degree - 1 + offset) % len(POLYNOMIALS)]
    per_channel = (stride + n_convs) % 2 == 1
    odd = (stride == n_convs) != (degree % 2 == 0)
    return polynomial, per_channel, (7, 5) if odd else (6, 6)


def test_cases_cover_every_family_layout_and_size_parity_at_every_degree():
    for degree in (1, 2, 3, 4):
        options = [case_options(d, s, k) for d, s, k in CASES if d == degree]
        assert {o[0] for o in options} == set(POLYNOMIALS)
        assert {o[1] for o in options} == {True, False}
        assert {o[2][0] % 2 for o in options} == {0, 1}


@pytest.mark.parametrize("degree,stride,n_convs", CASES)
@pytest.mark.numerics
def test_triton_equals_the_unfold_reference_fp32(degree, stride, n_convs, interpreted, monkeypatch):
    polynomial, per_channel, size = case_options(degree, stride, n_convs)
    torch.manual_seed(degree * 10 + stride * 3 + n_convs)
    channels = 3 + degree  # 4..7: never a whole channel block, so the channel masks are exercised
    conv = randomized(KANConv2d(channels, degree=degree, stride=stride, n_convs=n_convs, polynomial=polynomial,
                                per_channel=per_channel))
    x = torch.randn(2, channels, *size)
    out, grads, grad_out = run_conv(conv, x, "triton", monkeypatch)
    expected, expected_grads = reference(conv, x, grad_out, polynomial)
    assert out.shape == expected.shape
    assert relative_error(out, expected) <= 1e-5
    for name, grad, expected_grad in zip(("x", "base_weight", "poly_weight", "scaler"), grads, expected_grads):
        assert relative_error(grad, expected_grad) <= 1e-5, name


@pytest.mark.parametrize("dtype,stride,channels_last", [(torch.bfloat16, 1, True), (torch.bfloat16, 2, False),
                                                        (torch.float16, 2, True)])
@pytest.mark.numerics
def test_triton_half_precision_inputs_are_within_their_rounding(dtype, stride, channels_last, interpreted,
                                                                monkeypatch):
    # the reference gets the same rounded inputs and weights: what remains is the output's rounding
    torch.manual_seed(5)
    conv = randomized(KANConv2d(6, degree=3, stride=stride, n_convs=2, polynomial="legendre")).to(dtype)
    x = torch.randn(2, 6, 7, 6).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out, grads, grad_out = run_conv(conv, x, "triton", monkeypatch)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last) == channels_last
    conv64 = conv.double()
    expected, expected_grads = reference(conv64, x, grad_out, "legendre")
    assert relative_error(out, expected) <= 1e-2
    for name, grad, expected_grad in zip(("x", "base_weight", "poly_weight", "scaler"), grads, expected_grads):
        assert grad.dtype == dtype
        assert relative_error(grad, expected_grad) <= 2e-2, name


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    previous = os.environ.get("TRITON_INTERPRET")
    try:
        assert not _load_triton_kernels(interpret=False).INTERPRETED
        monkeypatch.setenv(kan_conv.IMPLEMENTATION_ENV, "triton")
        with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
            KANConv2d(4)(torch.randn(1, 4, 5, 5))
        assert "triton" not in kan_conv.available_implementations("cpu")
    finally:
        _load_triton_kernels(interpret=previous == "1")


class BytesWritten(TorchDispatchMode):
    """Bytes each op writes: the arguments it mutates, or else its outputs that are new memory (a
    view or an alias of an input writes nothing). A fresh torch.empty counts in full: the kernels
    that fill such buffers write every element of them once."""

    def __init__(self):
        super().__init__()
        self.per_op = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        mutated = [arg for argument, arg in zip(func._schema.arguments, args)
                   if argument.alias_info is not None and argument.alias_info.is_write]
        mutated += [kwargs[a.name] for a in func._schema.arguments
                    if a.name in kwargs and a.alias_info is not None and a.alias_info.is_write]
        if mutated:
            written = [t for t in tree_flatten(mutated)[0] if isinstance(t, torch.Tensor)]
        else:
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor) and t.device.type != "meta"}
            written = [t for t in tree_flatten(out)[0]
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs]
        self.per_op[str(func)] += sum(t.numel() * t.element_size() for t in written)
        return out

    @property
    def total(self) -> int:
        return sum(self.per_op.values())


def bytes_written(implementation: str, x, weight, bias, stride, coefficients):
    """One forward + backward of `implementation`'s CUDA code path, run on CPU under BytesWritten.

    Triton launches run outside the mode: under the interpreter a launch copies each argument's
    storage back after the run, an artefact of interpreting that a GPU does not do; what the
    kernels write is counted through the torch.empty buffers they fill.
    """
    run = kan_conv.IMPLEMENTATIONS[implementation]
    grad_out = torch.randn(kan_conv._output_shape(x, weight, stride), dtype=x.dtype).contiguous(
        memory_format=torch.channels_last)
    counter = BytesWritten()
    with counter:
        run.forward(x, weight, bias, stride, coefficients, "tanh")
        run.backward(grad_out, x, weight, stride, coefficients, "tanh")
    return counter


@pytest.mark.parametrize("channels,size,stride,degree", [(64, 7, 1, 2), (32, 14, 2, 3)])
def test_triton_writes_at_most_3x_input_output_and_weights(channels, size, stride, degree, interpreted, monkeypatch,
                                                           capsys):
    # RKANet-50's stage-4 KAN convolutions (2048 ch 7x7 stride 1 degree 2; 512 ch 14x14 stride 2
    # degree 3) with fewer channels and images, bf16 and channels_last as CUDA trains them
    launches = []

    def launch_outside_the_mode(kernel, grid, *args, **meta):
        launches.append(kernel)
        with _disable_current_modes():
            kernel[grid](*args, **meta)

    monkeypatch.setattr(interpreted, "_launch", launch_outside_the_mode)
    torch.manual_seed(6)
    conv = KANConv2d(channels, degree=degree, stride=stride)
    weight, bias = (t.detach().to(torch.bfloat16) for t in conv.grouped_conv_parameters())
    x = torch.randn(4, channels, size, size).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out_bytes = x.element_size() * x.shape[0] * channels * ((size - 1) // stride + 1) ** 2
    budget = x.numel() * x.element_size() + out_bytes + (weight.numel() + bias.numel()) * weight.element_size()
    written = {name: bytes_written(name, x, weight, bias, stride, conv.coefficients)
               for name in ("triton", "grouped", "depthwise")}
    assert len(launches) == 2  # the forward and the backward kernel, nothing else outside the count
    with capsys.disabled():
        print(f"\nKAN conv {channels} ch {size}x{size} stride {stride} degree {degree}, bf16 fwd+bwd, bytes written / "
              f"(input + output + weights = {budget:,} B): "
              + ", ".join(f"{name} {counter.total / budget:.2f}x" for name, counter in written.items()))
        for name, counter in written.items():
            print(f"  {name}: " + ", ".join(f"{op} {n:,}" for op, n in counter.per_op.most_common(6)))
    assert written["triton"].total <= 3 * budget
    assert written["grouped"].total > written["triton"].total


@pytest.mark.parametrize("degree,stride,n_convs,polynomial", [(5, 2, 1, "hermite"), (6, 1, 2, "jacobi")])
@pytest.mark.numerics
def test_triton_degrees_5_and_6(degree, stride, n_convs, polynomial, interpreted, monkeypatch):
    torch.manual_seed(degree)
    conv = randomized(KANConv2d(5, degree=degree, stride=stride, n_convs=n_convs, polynomial=polynomial))
    x = torch.randn(2, 5, 6, 7)
    out, grads, grad_out = run_conv(conv, x, "triton", monkeypatch)
    expected, expected_grads = reference(conv, x, grad_out, polynomial)
    assert relative_error(out, expected) <= 1e-5
    for name, grad, expected_grad in zip(("x", "base_weight", "poly_weight", "scaler"), grads, expected_grads):
        assert relative_error(grad, expected_grad) <= 1e-5, name


@pytest.mark.timeout(600)
def test_kernels_build_for_sm90_without_register_spills_at_rknet50_stage4():
    # no GPU needed: Triton builds the cubin offline with its bundled ptxas, and cuobjdump reads the
    # registers and the stack a kernel uses (spills go to the stack). RKANet-50's stage-4 KAN convs:
    # degree 3 stride 2 and degree 2 stride 1, one kernel each, bf16.
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.access(tool, os.X_OK):
        pytest.skip("this triton has no bundled NVIDIA tools")
    previous = os.environ.get("TRITON_INTERPRET")
    module = _load_triton_kernels(interpret=False)
    try:
        for degree, stride in ((3, 2), (2, 1)):
            for kernel, tensors, block_p, block_c in (
                    (module._kan_conv_forward_kernel, ("x_ptr", "out_ptr"), 16, 64),
                    (module._kan_conv_backward_kernel, ("x_ptr", "go_ptr", "gx_ptr"), 4, 32)):
                constants = {"K": 1, "F": degree + 1, "STRIDE": stride, "USE_TANH": True, "BLOCK_P": block_p,
                             "BLOCK_C": block_c}
                signature = {name: ("constexpr" if name in constants else "*bf16" if name in tensors
                                    else "*fp32" if name.endswith("_ptr") else "i32") for name in kernel.arg_names}
                built = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                       options={"num_warps": 4})
                with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                    cubin.write(built.asm["cubin"])
                    cubin.flush()
                    usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True,
                                           check=True).stdout
                assert "STACK:0 " in usage and "LOCAL:0 " in usage, (kernel.__name__, degree, stride, usage)
    finally:
        _load_triton_kernels(interpret=previous == "1")
