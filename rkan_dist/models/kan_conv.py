"""The RKAN paper's 3x3 KAN convolution, computed without unfolding.

For every channel c and output position, the reference code unfolds the zero-padded 3x3 patch
p (taps t = 3*ky + kx) and evaluates one learnable function of it:

    out = sum_t base_weight[t] * p_t + sum_t sum_n poly_weight[t, n] * scaler[t] * P_n(tanh(p_t))

Because P_n(tanh(.)) acts element-wise, the same numbers come from computing the feature maps
[x, P_1(tanh x), ..., P_d(tanh x)] once on the padded input and applying the per-tap weights as
one grouped 3x3 convolution (groups = channels). P_0 = 1 everywhere (padding included), so its
taps fold into a bias. The feature maps are (d+1) times the input, so the op keeps only the
input for backward and recomputes them there: that is what keeps an RKAN model's activation
memory within a few percent of its backbone's.

One op, several kernels. `kan_conv` (torch.ops.rkan_dist.kan_conv, with its backward op, fake
implementations and FLOP formulas) is what KANConv2d calls; torch.compile and the FLOP counter
see that one op. It runs one of IMPLEMENTATIONS, all held to the same unfold reference in the
tests, forward and backward:

- cpu: the numba kernels of `kan_conv_cpu`, the feature maps never in memory (several times
  faster than oneDNN's grouped convolution at RKANet-50's shapes: docs/MEASURED.md);
- triton: the fused kernels of `kan_conv_triton` (CUDA; CPU tensors under TRITON_INTERPRET=1):
  x is read and the output written, the features live in registers only;
- grouped: the grouped convolution over the materialised feature maps;
- depthwise: one depthwise 3x3 convolution per feature map, summed (cuDNN's depthwise kernels).

RKAN_KAN_CONV_IMPL=auto|cpu|triton|grouped|depthwise chooses (read on every call; a forced one
that cannot run here is an error). `auto`: on CPU the numba kernels, the grouped convolution for
fp64 and under dispatch modes; on CUDA each (shape without the batch, dtype, layout, stride, degree)
times the CUDA candidates once, like cudnn.benchmark, keeps the fastest and logs it once. Which rank
times, and where a collective may carry its choice (inside shared_choices(), the training forward,
only): choose_implementation. bench/gpu_check.sh reads available_implementations and
time_implementations.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode
from torch.utils.flop_counter import register_flop_formula

log = logging.getLogger(__name__)

POLYNOMIALS = ("chebyshev", "legendre", "hermite", "jacobi")
NORMALIZATIONS = ("tanh", "none")
JACOBI_ALPHA = JACOBI_BETA = 0.5
TAPS = 9  # a 3x3 kernel, row-major like F.unfold


def recurrence_coefficients(polynomial: str, degree: int) -> tuple[tuple[float, float, float], ...]:
    """(A_n, B_n, C_n) for n = 0..degree-1 with P_{n+1} = (A_n u + B_n) P_n - C_n P_{n-1}, P_0 = 1."""
    if polynomial not in POLYNOMIALS:
        raise ValueError(f"polynomial={polynomial!r} is not supported; choose one of {', '.join(POLYNOMIALS)}")
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    coefficients = []
    for n in range(degree):
        if polynomial == "chebyshev":
            coefficients.append((1.0 if n == 0 else 2.0, 0.0, 1.0))
        elif polynomial == "legendre":
            coefficients.append(((2 * n + 1) / (n + 1), 0.0, n / (n + 1)))
        elif polynomial == "hermite":  # physicists' H_n: H_1 = 2u
            coefficients.append((2.0, 0.0, 2.0 * n))
        else:
            coefficients.append(_jacobi_coefficients(n + 1, JACOBI_ALPHA, JACOBI_BETA))
    return tuple(coefficients)


def _jacobi_coefficients(m: int, a: float, b: float) -> tuple[float, float, float]:
    """Coefficients that produce P_m of the Jacobi family (alpha=a, beta=b)."""
    if m == 1:  # P_1 = (a - b)/2 + (a + b + 2)/2 * u
        return ((a + b + 2) / 2, (a - b) / 2, 0.0)
    s = 2 * m + a + b
    denominator = 2 * m * (m + a + b) * (s - 2)
    return ((s - 1) * s * (s - 2) / denominator,
            (s - 1) * (a * a - b * b) / denominator,
            2 * (m + a - 1) * (m + b - 1) * s / denominator)


def polynomial_maps(u: torch.Tensor, coefficients) -> list[torch.Tensor]:
    """[P_1(u), ..., P_d(u)] by the three-term recurrence (P_0 = 1 is left out: it is a bias)."""
    maps: list[torch.Tensor] = []
    for n, (a, b, c) in enumerate(coefficients):
        linear = u * a + b if b else u * a
        if n == 0:
            maps.append(linear)
        elif n == 1:  # P_{n-1} = P_0 = 1
            maps.append(linear * maps[0] - c)
        else:
            maps.append(linear * maps[n - 1] - c * maps[n - 2])
    return maps


def power_series(coefficients) -> list[list[float]]:
    """Coefficients (lowest power first) of P_0..P_d in powers of u, from the recurrence."""
    series = [[1.0]]
    for n, (a, b, c) in enumerate(coefficients):
        current, previous = series[n], series[n - 1] if n > 0 else []
        nxt = [0.0] * (len(current) + 1)
        for m, value in enumerate(current):
            nxt[m + 1] += a * value
            nxt[m] += b * value
        for m, value in enumerate(previous):
            nxt[m] -= c * value
        series.append(nxt)
    return series


def _polynomial_derivative_sum(u: torch.Tensor, coefficients, grads: list[torch.Tensor]) -> torch.Tensor:
    """sum_n grads[n-1] * P_n'(u), as sum_m h_m u^m with h_m = sum_n grads[n-1] * d/du-coefficient.

    Gathering the grads per power of u first and then one Horner pass takes about a third of the
    element-wise passes of running the derivative recurrence.
    """
    series = power_series(coefficients)
    per_power: list[torch.Tensor | None] = [None] * len(coefficients)
    for n, grad in enumerate(grads, start=1):
        for m in range(1, n + 1):
            weight = m * series[n][m]
            if weight:
                h = per_power[m - 1]
                per_power[m - 1] = grad * weight if h is None else torch.add(h, grad, alpha=weight)
    total = None
    for h in reversed(per_power):
        if h is None:
            h = torch.zeros_like(u) if total is None else None
        if total is None:
            total = h
        elif h is None:
            total = total * u
        else:
            total = torch.addcmul(h, total, u)
    return total if total is not None else torch.zeros_like(u)


def _feature_maps(x_padded: torch.Tensor, coefficients, normalization: str, dtype: torch.dtype) -> torch.Tensor:
    """[B, C*(d+1), Hp, Wp] channels_last: per channel c, maps x, P_1(u)..P_d(u) at c*(d+1) + f.

    Always channels_last: the grouped convolution's backward is faster in NHWC on CPU (docs/MEASURED.md).
    The polynomials are evaluated in fp32 even under autocast (bf16 loses the recurrence), in
    fp64 for fp64 inputs.
    """
    x_exact = x_padded.to(_evaluation_dtype(x_padded.dtype))
    u = torch.tanh(x_exact) if normalization == "tanh" else x_exact
    maps = [x_exact, *polynomial_maps(u, coefficients)]
    nhwc = torch.stack([m.to(dtype).permute(0, 2, 3, 1) for m in maps], dim=-1)  # [B, Hp, Wp, C, d+1]
    return nhwc.flatten(3).permute(0, 3, 1, 2)


def _evaluation_dtype(dtype: torch.dtype) -> torch.dtype:
    """tanh and the polynomials run in fp32 for fp32/bf16/fp16 data, in fp64 for fp64 data."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _autocast_enabled(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast_off(device_type: str):
    """Inside the fused op dtypes are chosen explicitly; meta tensors (FLOP counting) have no autocast."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _use_cpu_kernels(x: torch.Tensor) -> bool:
    """`auto` on CPU: the numba kernels run eagerly on CPU data. Under FLOP counting or any other
    dispatch mode the grouped convolution stands in: it computes the same numbers with ops those
    tools can see."""
    return (x.device.type == "cpu" and x.dtype in _CPU_KERNEL_DTYPES and not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode())


_CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp32 inside; fp64 keeps the conv


@functools.cache
def _recurrence_tables(coefficients) -> tuple[np.ndarray, np.ndarray]:
    """The kernels' recurrence table [d, 3] and the features of the zero padding (tanh 0 = 0) [d+1],
    computed once per polynomial family and degree rather than on every call."""
    recurrences = np.array(coefficients, dtype=np.float32).reshape(-1, 3)
    zero = torch.zeros(1, dtype=torch.float64)
    border = np.array([0.0, *(p.item() for p in polynomial_maps(zero, coefficients))], dtype=np.float32)
    recurrences.setflags(write=False)  # shared by every call: nobody may change them
    border.setflags(write=False)
    return recurrences, border


def _kernel_major(out: torch.Tensor, channels: int) -> torch.Tensor:
    """Grouped-conv channel order c*K + k -> the op's k*C + c (a copy only when K > 1)."""
    kernels = out.shape[1] // channels
    return out if kernels == 1 else out.unflatten(1, (channels, kernels)).transpose(1, 2).flatten(1, 2)


def _channel_major(grad_out: torch.Tensor, channels: int) -> torch.Tensor:
    """The op's k*C + c -> the grouped convolution's c*K + k."""
    kernels = grad_out.shape[1] // channels
    return grad_out if kernels == 1 else grad_out.unflatten(1, (kernels, channels)).transpose(1, 2).flatten(1, 2)


# --- cpu: the numba kernels ---------------------------------------------------------------------

def _cpu_kernel_arguments(x: torch.Tensor, weight: torch.Tensor, coefficients):
    """fp32 x, the taps as [K, 9, F, C] (channels innermost, as the kernels vectorise), the recurrences."""
    from rkan_dist.models import kan_conv_cpu

    x = x.detach().float().contiguous()
    channels, n_features = x.shape[1], weight.shape[1]
    taps = weight.detach().float().reshape(channels, -1, n_features, 9).permute(1, 3, 2, 0).contiguous()
    return kan_conv_cpu, x, taps, *_recurrence_tables(coefficients)


def _cpu_forward(x, weight, bias, stride, coefficients, normalization) -> torch.Tensor:
    kan_conv_cpu, x32, taps, recurrences, border = _cpu_kernel_arguments(x, weight, coefficients)
    batch, channels, height, width = x.shape
    bias_kc = bias.detach().float().reshape(channels, -1).t().contiguous()
    out = x32.new_empty(batch, weight.shape[0], (height - 1) // stride + 1, (width - 1) // stride + 1)
    kan_conv_cpu.run_tasks(kan_conv_cpu.kan_conv_forward, kan_conv_cpu.task_count(batch, channels), x32.numpy(),
                           taps.numpy(), bias_kc.numpy(), stride, recurrences, normalization == "tanh", border,
                           out.numpy())
    return out.to(x.dtype).contiguous(memory_format=_memory_format(x))


def _cpu_backward(grad_out, x, weight, stride, coefficients, normalization):
    kan_conv_cpu, x32, taps, recurrences, border = _cpu_kernel_arguments(x, weight, coefficients)
    grad_x = torch.empty_like(x32)
    grad_taps_per_image = x32.new_empty(x.shape[0], *taps.shape)
    grad_out = grad_out.float().contiguous()
    kan_conv_cpu.run_tasks(kan_conv_cpu.kan_conv_backward, kan_conv_cpu.task_count(*x.shape[:2]), x32.numpy(),
                           grad_out.numpy(), taps.numpy(), stride, recurrences,
                           normalization == "tanh", border, grad_x.numpy(), grad_taps_per_image.numpy())
    grad_weight = grad_taps_per_image.sum(0).permute(3, 0, 2, 1).reshape(weight.shape).to(weight.dtype)
    grad_x = grad_x.to(x.dtype).contiguous(memory_format=_memory_format(x))
    grad_bias = _channel_major(grad_out.sum((0, 2, 3))[None, :, None, None], x.shape[1]).flatten()
    return grad_x, grad_weight, grad_bias.to(weight.dtype)


# --- grouped: one grouped 3x3 conv over all (d+1) feature maps --------------------------------------

def _grouped_forward(x, weight, bias, stride, coefficients, normalization) -> torch.Tensor:
    features = _feature_maps(F.pad(x, (1, 1, 1, 1)), coefficients, normalization, x.dtype)
    out = F.conv2d(features, weight, bias, stride=stride, groups=x.shape[1])
    return _kernel_major(out, x.shape[1]).contiguous(memory_format=_memory_format(x))


def _grouped_backward(grad_out, x, weight, stride, coefficients, normalization):
    channels, n_features = x.shape[1], len(coefficients) + 1
    x_padded = F.pad(x, (1, 1, 1, 1))
    features = _feature_maps(x_padded, coefficients, normalization, x.dtype)
    grad_out = _channel_major(grad_out.to(x.dtype), channels).contiguous(memory_format=torch.channels_last)
    grad_features, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_out, features, weight, [weight.shape[0]], [stride, stride], [0, 0], [1, 1],
        False, [0, 0], channels, [True, True, True])
    del features
    # per feature map f: [B, C, H, W], the padding border dropped
    exact = _evaluation_dtype(x.dtype)
    per_map = grad_features.unflatten(1, (channels, n_features))[:, :, :, 1:-1, 1:-1].to(exact)
    grads = per_map.unbind(2)
    x_exact = x.to(exact)
    u = torch.tanh(x_exact) if normalization == "tanh" else x_exact
    chain = _polynomial_derivative_sum(u, coefficients, grads[1:])
    if normalization == "tanh":  # d tanh = 1 - tanh^2
        chain = chain - chain * u * u
    grad_x = (grads[0] + chain).to(x.dtype).contiguous(memory_format=_memory_format(x))
    return grad_x, grad_weight, grad_bias


# --- depthwise: one depthwise 3x3 conv per feature map, summed ----------------------------------------

def _maps_and_slopes(x: torch.Tensor, coefficients, normalization: str):
    """(feature map f, its derivative in u or None for f = 0, u) for f = 0..d, one at a time, in the
    evaluation dtype: x, then P_n(u) and P_n'(u) by the recurrence and its derivative."""
    exact = x.to(_evaluation_dtype(x.dtype))
    u = torch.tanh(exact) if normalization == "tanh" else exact
    yield exact, None, u
    previous = previous_slope = current = slope = None
    for n, (a, b, c) in enumerate(coefficients):
        linear = u * a + b if b else u * a
        if n == 0:
            following, following_slope = linear, torch.full_like(u, a)
        else:
            following = linear * current - (c if n == 1 else c * previous)
            following_slope = current * a + linear * slope
            if n > 1:
                following_slope = following_slope - c * previous_slope
        previous, previous_slope, current, slope = current, slope, following, following_slope
        yield current, slope, u


def _depthwise_forward(x, weight, bias, stride, coefficients, normalization) -> torch.Tensor:
    # conv2d's own zero padding, with the maps shifted by their value at 0 (the padding's features
    # P_n(tanh 0)) so that padding them with zeros is right; the shift comes back as a bias
    channels, border = x.shape[1], _recurrence_tables(coefficients)[1]
    out = None
    for f, (feature, _, _) in enumerate(_maps_and_slopes(x, coefficients, normalization)):
        shift = float(border[f])
        tap_weight = weight[:, f:f + 1]
        if shift:
            feature = feature - shift
            bias = bias + shift * tap_weight.sum((1, 2, 3))
        y = F.conv2d(feature.to(x.dtype), tap_weight, None, stride=stride, padding=1, groups=channels)
        out = y if out is None else out.add_(y)
    out = out.add_(bias[None, :, None, None])
    return _kernel_major(out, channels).contiguous(memory_format=_memory_format(x))


def _depthwise_backward(grad_out, x, weight, stride, coefficients, normalization):
    channels, border = x.shape[1], _recurrence_tables(coefficients)[1]
    grad_out = _channel_major(grad_out.to(x.dtype), channels).contiguous(memory_format=_memory_format(x))
    grad_bias = grad_out.sum((0, 2, 3))
    grad_weights, grad_x = [], None
    for f, (feature, slope, u) in enumerate(_maps_and_slopes(x, coefficients, normalization)):  # noqa: B007 - u: after
        shift = float(border[f])
        grad_feature, grad_tap, _ = torch.ops.aten.convolution_backward(
            grad_out, (feature - shift if shift else feature).to(x.dtype), weight[:, f:f + 1], None,
            [stride, stride], [1, 1], [1, 1], False, [0, 0], channels, [True, True, False])
        grad_weights.append(grad_tap + shift * grad_bias[:, None, None, None] if shift else grad_tap)
        if f == 0:
            grad_x, chain = grad_feature.to(feature.dtype), None
        else:
            term = grad_feature.to(feature.dtype) * slope
            chain = term if chain is None else chain.add_(term)
    if chain is not None:
        if normalization == "tanh":  # d tanh = 1 - tanh^2
            chain = chain - chain * u * u
        grad_x = grad_x + chain
    grad_weight = torch.cat(grad_weights, dim=1)
    return grad_x.to(x.dtype).contiguous(memory_format=_memory_format(x)), grad_weight, grad_bias


# --- triton: the fused kernels of kan_conv_triton ------------------------------------------------------

def _triton_module():
    from rkan_dist.models import kan_conv_triton  # imports triton; reads TRITON_INTERPRET once

    return kan_conv_triton


def _flat(coefficients) -> tuple[float, ...]:
    return tuple(float(v) for abc in coefficients for v in abc)


def _triton_forward(x, weight, bias, stride, coefficients, normalization) -> torch.Tensor:
    return _triton_module().forward(x, weight, bias, stride, _flat(coefficients), normalization == "tanh")


def _triton_backward(grad_out, x, weight, stride, coefficients, normalization):
    border = tuple(float(v) for v in _recurrence_tables(coefficients)[1])
    return _triton_module().backward(grad_out, x, weight, stride, _flat(coefficients), normalization == "tanh",
                                     border)


class Implementation(NamedTuple):
    """forward(x, weight, bias, stride, coefficients, normalization) -> out [B, K*C, Ho, Wo] kernel-major;
    backward(grad_out, x, weight, stride, coefficients, normalization) -> (grad_x, grad_weight, grad_bias).
    weight [C*K, d+1, 3, 3] and bias [C*K] in the grouped convolution's order c*K + k."""

    forward: Callable
    backward: Callable


IMPLEMENTATIONS: dict[str, Implementation] = {
    "cpu": Implementation(_cpu_forward, _cpu_backward),
    "triton": Implementation(_triton_forward, _triton_backward),
    "grouped": Implementation(_grouped_forward, _grouped_backward),
    "depthwise": Implementation(_depthwise_forward, _depthwise_backward),
}
IMPLEMENTATION_ENV = "RKAN_KAN_CONV_IMPL"
CUDA_CANDIDATES = ("triton", "grouped", "depthwise")  # what `auto` times on CUDA


def unavailable_reason(name: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """Why implementation `name` cannot run on `device` / `dtype` here, or None when it can."""
    device_type = torch.device(device).type
    if name == "cpu":
        if device_type != "cpu":
            return f"the numba kernels run on CPU tensors, got {device_type}"
        return None if dtype in _CPU_KERNEL_DTYPES else f"the numba kernels compute in fp32 (fp32/bf16/fp16 inputs), got {dtype}"
    if name == "triton":
        try:
            module = _triton_module()
        except ImportError as err:
            return f"triton is not importable: {err}"
        try:
            module.check_device(device_type, dtype)
        except RuntimeError as err:
            return str(err)
        return None
    if name in IMPLEMENTATIONS:
        return None
    return f"unknown KAN conv implementation {name!r}; choose one of {', '.join(IMPLEMENTATIONS)}"


def available_implementations(device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[str]:
    """The implementations that can run on `device` / `dtype` in this process (for bench/gpu_check)."""
    return [name for name in IMPLEMENTATIONS if unavailable_reason(name, device, dtype) is None]


def forced_implementation() -> str:
    """RKAN_KAN_CONV_IMPL: auto (default) or one implementation's name."""
    name = os.environ.get(IMPLEMENTATION_ENV, "auto").strip() or "auto"
    if name != "auto" and name not in IMPLEMENTATIONS:
        raise ValueError(f"{IMPLEMENTATION_ENV}={name!r} is not valid; choose one of auto, {', '.join(IMPLEMENTATIONS)}")
    return name


def time_implementations(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, coefficients,
                         normalization: str = "tanh", names=None, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per forward+backward of each implementation (best of `repeats` after a warm-up);
    an implementation that fails gets inf (and a warning), so a choice never depends on it."""
    names = names if names is not None else available_implementations(x.device, x.dtype)
    timings = {}
    with torch.no_grad(), _autocast_off(x.device.type):
        grad_out = None
        for name in names:
            implementation = IMPLEMENTATIONS[name]
            try:
                best = math.inf
                for repeat in range(repeats + 1):
                    _synchronize(x.device)
                    start = time.perf_counter()
                    out = implementation.forward(x, weight, bias, stride, coefficients, normalization)
                    grad_out = torch.ones_like(out) if grad_out is None else grad_out
                    implementation.backward(grad_out, x, weight, stride, coefficients, normalization)
                    _synchronize(x.device)
                    if repeat:  # the first run compiles (triton, numba) and picks cuDNN algorithms
                        best = min(best, time.perf_counter() - start)
                timings[name] = best * 1e3
            except Exception as err:  # noqa: BLE001 - a broken candidate must not stop training
                log.warning("KAN conv implementation %s failed while timing (%s: %s); not choosing it",
                            name, type(err).__name__, err)
                timings[name] = math.inf
    return timings


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CHOICES: dict[tuple, str] = {}  # decided inside shared_choices(): the same on every rank
# timed by a process that had no peers when it decided; kept apart from _CHOICES so that a process
# group formed later never finds on one rank a decision the others lack (they would broadcast alone)
_LOCAL_CHOICES: dict[tuple, str] = {}
_SHARED_DEPTH = 0  # open shared_choices() regions: a phase of the whole process, whichever thread runs the op
# test-only: the candidates `auto` times on CPU tensors (none: CPU keeps its rule), so that the
# timed, shared path runs under gloo on CPU
CPU_TIMED_CANDIDATES: tuple[str, ...] = ()
# outside shared_choices(), with peers and no training decision for the layer: the cuDNN form,
# which runs for every device, dtype and layout without compiling anything
DEFAULT_CHOICE = "grouped"


@contextlib.contextmanager
def shared_choices():
    """Mark a forward that every rank runs with the same layers and input shapes (the Trainer's
    training forward): only here may `auto` meet a new shape with a collective, rank 0 timing the
    candidates and broadcasting its choice. Shapes differ by batch size between ranks (the last
    batch) but not otherwise, so the choices are keyed without the batch size."""
    global _SHARED_DEPTH
    _SHARED_DEPTH += 1
    try:
        yield
    finally:
        _SHARED_DEPTH -= 1


def _choice_key(x: torch.Tensor, weight: torch.Tensor, stride: int, coefficients, normalization: str) -> tuple:
    """What a choice depends on; the batch size is left out (see shared_choices)."""
    return (str(x.device), tuple(x.shape[1:]), x.dtype, _memory_format(x), weight.shape[0], stride, len(coefficients),
            normalization)


def _timed_candidates(device_type: str) -> tuple[str, ...]:
    return CUDA_CANDIDATES if device_type == "cuda" else CPU_TIMED_CANDIDATES if device_type == "cpu" else ()


def choose_implementation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, coefficients,
                          normalization: str) -> str:
    """Which implementation runs this call.

    RKAN_KAN_CONV_IMPL forces one (an error if it cannot run here). `auto` on CPU: the numba kernels
    (the grouped convolution for fp64 and under dispatch modes). `auto` on CUDA, like cudnn.benchmark,
    times the candidates once per (shape without the batch, dtype, layout, stride, degree) and keeps
    the fastest; a collective may only be called where every rank reaches it with the same shapes:

    - inside shared_choices() (the training forward): a new shape is timed on rank 0 and broadcast,
      so every rank runs the same code and holds the same decisions;
    - outside it (eval with uneven shards, a forward on rank 0 alone), never a collective: the
      training decision for that shape, else the training decision for the same layer at the
      nearest size (eval at another resolution), else DEFAULT_CHOICE. These read only what every
      rank holds alike, so every rank still picks the same. A process without peers (no process
      group, or a world of one) times the shape itself instead: nobody else has to agree.

    The backward op asks with the forward's input, so it finds the forward's decision and needs no
    region of its own. The op chooses when it runs, compiled (torch.compile) or not, so the region
    is the caller's Python around the model call.
    """
    forced = forced_implementation()
    if forced != "auto":
        reason = unavailable_reason(forced, x.device, x.dtype)
        if reason is not None:
            raise RuntimeError(f"{IMPLEMENTATION_ENV}={forced}: {reason}")
        _log_once(forced, f"forced by {IMPLEMENTATION_ENV}")
        return forced
    if not _timed_candidates(x.device.type):
        name = "cpu" if _use_cpu_kernels(x) else "grouped"
        _log_once(name, f"auto on {x.device.type} {str(x.dtype).removeprefix('torch.')}")
        return name
    if _SHARED_DEPTH:
        return _timed_choice(x, weight, bias, stride, coefficients, normalization)
    return _local_choice(x, weight, bias, stride, coefficients, normalization)


@functools.cache
def _log_once(name: str, why: str) -> None:
    log.info("KAN conv: %s (%s)", name, why)


def _has_peers() -> bool:
    from rkan_dist import distributed as dist_utils

    return dist_utils.world_size() > 1


def _timed_choice(x, weight, bias, stride, coefficients, normalization) -> str:
    """Inside shared_choices(): every rank misses a key at the same call, so the broadcast is collective."""
    key = _choice_key(x, weight, stride, coefficients, normalization)
    if key not in _CHOICES:
        _CHOICES[key] = _decide(key, x, weight, bias, stride, coefficients, normalization, _has_peers())
    return _CHOICES[key]


def _local_choice(x, weight, bias, stride, coefficients, normalization) -> str:
    """Outside shared_choices(): no collective, whatever this rank alone runs."""
    key = _choice_key(x, weight, stride, coefficients, normalization)
    if key in _CHOICES:
        return _CHOICES[key]
    if not _has_peers():
        if key not in _LOCAL_CHOICES:
            _LOCAL_CHOICES[key] = _decide(key, x, weight, bias, stride, coefficients, normalization, False)
        return _LOCAL_CHOICES[key]
    name = _reused_choice(key, _CHOICES)
    _log_once(name, f"{_describe(key)}: outside the training step, without a collective")
    return name


def _reused_choice(key: tuple, choices: dict[tuple, str]) -> str:
    """The decision for `key` from `choices` alone: its own, else the one for the same layer
    (everything but the height and width) at the nearest number of pixels, else DEFAULT_CHOICE.
    Ties go to the earliest decision, so ranks holding the same `choices` pick the same."""
    if key in choices:
        return choices[key]

    def layer(k: tuple) -> tuple:
        return (k[0], k[1][0], *k[2:])

    pixels = math.prod(key[1][1:])
    same_layer = [(abs(math.prod(k[1][1:]) - pixels), name) for k, name in choices.items() if layer(k) == layer(key)]
    return min(same_layer, key=lambda distance_name: distance_name[0])[1] if same_layer else DEFAULT_CHOICE


def _describe(key: tuple) -> str:
    return (f"{list(key[1])} {str(key[2]).removeprefix('torch.')} "
            f"{'channels_last' if key[3] == torch.channels_last else 'NCHW'} stride {key[5]} degree {key[6]}")


def _decide(key, x, weight, bias, stride, coefficients, normalization, peers: bool) -> str:
    """The fastest candidate for `key`; with peers, rank 0 times and every rank receives its choice
    (a collective: only inside shared_choices())."""
    from rkan_dist import distributed as dist_utils

    timings: dict[str, float] = {}
    choice = None
    if not peers or dist_utils.rank() == 0:
        names = [name for name in _timed_candidates(x.device.type) if unavailable_reason(name, x.device, x.dtype) is None]
        timings = time_implementations(x, weight, bias, stride, coefficients, normalization, names)
        choice = min(timings, key=timings.get)
    if peers:
        choice = dist_utils.broadcast_object(choice)
    log.info("KAN conv %s: %s%s", _describe(key), choice,
             " (" + ", ".join(f"{n} {ms:.3f} ms" for n, ms in timings.items()) + ")" if timings else " (rank 0's choice)")
    return choice


# --- the op: one torch.library custom op, so torch.compile and the FLOP counter see one node --------

def _triples(coefficients: list[float]) -> tuple[tuple[float, float, float], ...]:
    return tuple(tuple(coefficients[i:i + 3]) for i in range(0, len(coefficients), 3))


def _output_shape(x: torch.Tensor, weight: torch.Tensor, stride: int) -> tuple[int, int, int, int]:
    batch, _, height, width = x.shape
    return batch, weight.shape[0], (height - 1) // stride + 1, (width - 1) // stride + 1


@torch.library.custom_op("rkan_dist::kan_conv", mutates_args=())
def kan_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, coefficients: list[float],
             normalization: str) -> torch.Tensor:
    """The fused KAN convolution: [B, K*C, Ho, Wo] kernel-major, in x's dtype and memory format.

    weight [C*K, d+1, 3, 3] / bias [C*K] in the grouped convolution's order (KANConv2d.grouped_conv_parameters),
    coefficients the flattened (A_n, B_n, C_n) of recurrence_coefficients.
    """
    triples = _triples(coefficients)
    name = choose_implementation(x, weight, bias, stride, triples, normalization)
    with _autocast_off(x.device.type):
        return IMPLEMENTATIONS[name].forward(x, weight, bias, stride, triples, normalization)


@kan_conv.register_fake
def _kan_conv_fake(x, weight, bias, stride, coefficients, normalization):
    return torch.empty(_output_shape(x, weight, stride), dtype=x.dtype, device=x.device,
                       memory_format=_memory_format(x))


@torch.library.custom_op("rkan_dist::kan_conv_backward", mutates_args=())
def kan_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int,
                      coefficients: list[float], normalization: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of kan_conv: the features are recomputed from x."""
    triples = _triples(coefficients)
    name = choose_implementation(x, weight, weight.new_empty(0), stride, triples, normalization)
    with _autocast_off(x.device.type):
        grad_x, grad_weight, grad_bias = IMPLEMENTATIONS[name].backward(grad_out, x, weight, stride, triples,
                                                                        normalization)
    return grad_x, _like(grad_weight, weight), grad_bias.to(weight.dtype)


def _like(value: torch.Tensor, template: torch.Tensor) -> torch.Tensor:
    """`value` with the dtype and strides of torch.empty_like(template), which the fake implementation
    promises (compiled graphs check them): an implementation's weight gradient may come out permuted."""
    expected = torch.empty_like(template)
    return value if value.dtype == expected.dtype and value.stride() == expected.stride() else expected.copy_(value)


@kan_conv_backward.register_fake
def _kan_conv_backward_fake(grad_out, x, weight, stride, coefficients, normalization):
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x)),
            torch.empty_like(weight), weight.new_empty(weight.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _, stride, coefficients, normalization = inputs
    ctx.save_for_backward(x, weight)  # only the input: backward recomputes the feature maps
    ctx.stride, ctx.coefficients, ctx.normalization = stride, coefficients, normalization


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = kan_conv_backward(grad_out, x, weight, ctx.stride, ctx.coefficients,
                                                       ctx.normalization)
    return grad_x, grad_weight, grad_bias, None, None, None


kan_conv.register_autograd(_backward, setup_context=_setup_context)


def _flops(x_shape, w_shape, stride) -> int:
    """As for the grouped convolution it computes: 2 * outputs * (d+1) * 9."""
    batch, _, height, width = x_shape
    return 2 * batch * w_shape[0] * ((height - 1) // stride + 1) * ((width - 1) // stride + 1) * w_shape[1] * 9


@register_flop_formula(torch.ops.rkan_dist.kan_conv)
def _kan_conv_flops(x_shape, w_shape, b_shape, stride, *args, out_shape=None, **kwargs) -> int:
    return _flops(x_shape, w_shape, stride)


@register_flop_formula(torch.ops.rkan_dist.kan_conv_backward)
def _kan_conv_backward_flops(g_shape, x_shape, w_shape, stride, *args, out_shape=None, **kwargs) -> int:
    return 2 * _flops(x_shape, w_shape, stride)  # grad of the feature maps and of the weights, as a conv's


class KANConv2d(nn.Module):
    """3x3 KAN convolution (padding 1): `n_convs` learnable functions of a 3x3 patch.

    Shared (default, as the reference): each function is used by every channel and position,
    parameters `base_weight` [n_convs, 9], `poly_weight` [n_convs, 9, degree+1], `scaler`
    [n_convs, 9]. `per_channel=True` gives every channel its own function (a channel axis after
    the kernel axis). Output: channels * n_convs channels, kernel-major (kernel k's C channels, then k+1).
    """

    def __init__(self, channels: int, degree: int = 3, stride: int = 1, n_convs: int = 1,
                 polynomial: str = "chebyshev", normalization: str = "tanh", per_channel: bool = False):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if n_convs < 1:
            raise ValueError(f"n_convs must be >= 1, got {n_convs}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization={normalization!r} is not supported; choose one of {', '.join(NORMALIZATIONS)}")
        self.coefficients = recurrence_coefficients(polynomial, degree)
        self.channels, self.degree, self.stride, self.n_convs = channels, degree, stride, n_convs
        self.polynomial, self.normalization, self.per_channel = polynomial, normalization, per_channel
        shape = (n_convs, channels, TAPS) if per_channel else (n_convs, TAPS)
        self.base_weight = nn.Parameter(torch.empty(shape))
        self.poly_weight = nn.Parameter(torch.empty(*shape, degree + 1))
        self.scaler = nn.Parameter(torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # kaiming-normal of a Linear(9 -> 1) (fan_in 9, relu gain); written out because
        # kaiming_normal_ would read the channel axis of the per-channel shape as fan-in
        nn.init.normal_(self.base_weight, std=math.sqrt(2.0 / TAPS))
        nn.init.normal_(self.poly_weight, std=1.0 / math.sqrt(TAPS * (self.degree + 1)))
        nn.init.ones_(self.scaler)

    def grouped_conv_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight [C*n_convs, d+1, 3, 3] and bias [C*n_convs] of the grouped conv (index c*n_convs + k)."""
        scaled = self.poly_weight * self.scaler.unsqueeze(-1)  # [K, (C,) 9, d+1]
        per_tap = torch.cat([self.base_weight.unsqueeze(-1), scaled[..., 1:]], dim=-1)  # [K, (C,) 9, d+1]
        bias = scaled[..., 0].sum(-1)  # P_0 = 1: its taps add a constant
        if not self.per_channel:
            per_tap = per_tap.unsqueeze(1).expand(-1, self.channels, -1, -1)
            bias = bias.unsqueeze(1).expand(-1, self.channels)
        weight = per_tap.transpose(0, 1).transpose(2, 3).reshape(self.channels * self.n_convs, self.degree + 1, 3, 3)
        return weight, bias.transpose(0, 1).reshape(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"KANConv2d({self.channels}) expects [B, {self.channels}, H, W], got {tuple(x.shape)}")
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if _autocast_enabled(device) else x.dtype
        weight, bias = self.grouped_conv_parameters()
        return kan_conv(x.to(dtype), weight.to(dtype), bias.to(dtype), self.stride, list(_flat(self.coefficients)),
                        self.normalization)

    def extra_repr(self) -> str:
        return (f"{self.channels}, degree={self.degree}, stride={self.stride}, n_convs={self.n_convs}, "
                f"polynomial={self.polynomial!r}, normalization={self.normalization!r}, per_channel={self.per_channel}")
