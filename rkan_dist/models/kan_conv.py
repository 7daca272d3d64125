"""The RKAN paper's 3x3 KAN convolution, computed without unfolding.

For every channel c and output position, the reference code unfolds the zero-padded 3x3 patch
p (taps t = 3*ky + kx) and evaluates one learnable function of it:

    out = sum_t base_weight[t] * p_t + sum_t sum_n poly_weight[t, n] * scaler[t] * P_n(tanh(p_t))

Because P_n(tanh(.)) acts element-wise, the same numbers come from computing the feature maps
[x, P_1(tanh x), ..., P_d(tanh x)] once on the padded input and applying the per-tap weights as
one grouped 3x3 convolution (groups = channels). P_0 = 1 everywhere (padding included), so its
taps fold into a bias. The feature maps are (d+1) times the input, so `_PolynomialFeatureConv`
keeps only the input for backward and recomputes them there: that is what keeps an RKAN model's
activation memory within a few percent of its backbone's.

On CPU, the numba kernels of `kan_conv_cpu` compute the same thing without the feature maps ever
reaching memory (12x / 33x faster than the unfold reference at RKANet-50's stage-4 shapes, where
oneDNN's grouped convolution managed 1.6x / 3.9x); the grouped convolution serves CUDA (cuDNN runs
it well), torch.compile and FLOP counting. Tests run both paths against the unfold reference.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

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

    Always channels_last: the grouped convolution's backward is 1.5-4x faster in NHWC on CPU.
    The polynomials are evaluated in fp32 even under autocast (bf16 loses the recurrence).
    """
    x32 = x_padded.float()
    u = torch.tanh(x32) if normalization == "tanh" else x32
    maps = [x32, *polynomial_maps(u, coefficients)]
    nhwc = torch.stack([m.to(dtype).permute(0, 2, 3, 1) for m in maps], dim=-1)  # [B, Hp, Wp, C, d+1]
    return nhwc.flatten(3).permute(0, 3, 1, 2)


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
    """The numba kernels run eagerly on CPU data. Under torch.compile, FLOP counting or fake
    tensors (any dispatch mode) the grouped convolution stands in: it computes the same numbers
    with ops those tools can trace and count."""
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


def _cpu_kernel_arguments(x: torch.Tensor, weight: torch.Tensor, coefficients):
    """fp32 x, the taps as [K, 9, F, C] (channels innermost, as the kernels vectorise), the recurrences."""
    from rkan_dist.models import kan_conv_cpu

    x = x.detach().float().contiguous()
    channels, n_features = x.shape[1], weight.shape[1]
    taps = weight.detach().float().view(channels, -1, n_features, 9).permute(1, 3, 2, 0).contiguous()
    return kan_conv_cpu, x, taps, *_recurrence_tables(coefficients)


def _cpu_forward(x, weight, bias, stride, coefficients, normalization) -> torch.Tensor:
    kan_conv_cpu, x32, taps, recurrences, border = _cpu_kernel_arguments(x, weight, coefficients)
    batch, channels, height, width = x.shape
    bias_kc = bias.detach().float().view(channels, -1).t().contiguous()
    out = x32.new_empty(batch, weight.shape[0], (height - 1) // stride + 1, (width - 1) // stride + 1)
    kan_conv_cpu.run_tasks(kan_conv_cpu.kan_conv_forward, kan_conv_cpu.task_count(batch, channels), x32.numpy(),
                           taps.numpy(), bias_kc.numpy(), stride, recurrences, normalization == "tanh", border,
                           out.numpy())
    return out.to(x.dtype).contiguous(memory_format=_memory_format(x))


def _cpu_backward(x, weight, grad_out, stride, coefficients, normalization):
    kan_conv_cpu, x32, taps, recurrences, border = _cpu_kernel_arguments(x, weight, coefficients)
    grad_x = torch.empty_like(x32)
    grad_taps_per_image = x32.new_empty(x.shape[0], *taps.shape)
    kan_conv_cpu.run_tasks(kan_conv_cpu.kan_conv_backward, kan_conv_cpu.task_count(*x.shape[:2]), x32.numpy(),
                           grad_out.float().contiguous().numpy(), taps.numpy(), stride, recurrences,
                           normalization == "tanh", border, grad_x.numpy(), grad_taps_per_image.numpy())
    grad_weight = grad_taps_per_image.sum(0).permute(3, 0, 2, 1).reshape(weight.shape).to(weight.dtype)
    grad_x = grad_x.to(x.dtype).contiguous(memory_format=_memory_format(x))
    return grad_x, grad_weight, grad_out.sum((0, 2, 3))


class _PolynomialFeatureConv(torch.autograd.Function):
    """Grouped 3x3 conv over the polynomial feature maps of x; saves x only, recomputes the maps.

    On CPU the numba kernels of `kan_conv_cpu` compute it without the feature maps in memory;
    elsewhere (CUDA, compile, FLOP counting) the grouped convolution does.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, coefficients, normalization):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.coefficients, ctx.normalization = stride, coefficients, normalization
        if _use_cpu_kernels(x):
            return _cpu_forward(x, weight, bias, stride, coefficients, normalization)
        with _autocast_off(x.device.type):
            features = _feature_maps(F.pad(x, (1, 1, 1, 1)), coefficients, normalization, x.dtype)
            out = F.conv2d(features, weight, bias, stride=stride, groups=x.shape[1])
        return out.contiguous(memory_format=_memory_format(x))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        if _use_cpu_kernels(x):
            return (*_cpu_backward(x, weight, grad_out, ctx.stride, ctx.coefficients, ctx.normalization),
                    None, None, None)
        channels, n_features = x.shape[1], len(ctx.coefficients) + 1
        with _autocast_off(x.device.type):
            x_padded = F.pad(x, (1, 1, 1, 1))
            features = _feature_maps(x_padded, ctx.coefficients, ctx.normalization, x.dtype)
            grad_out = grad_out.to(x.dtype).contiguous(memory_format=torch.channels_last)
            grad_features, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_out, features, weight, [weight.shape[0]], [ctx.stride, ctx.stride], [0, 0], [1, 1],
                False, [0, 0], channels, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]])
            del features
            grad_x = None
            if ctx.needs_input_grad[0]:
                # per feature map f: [B, C, H, W], the padding border dropped
                per_map = grad_features.unflatten(1, (channels, n_features))[:, :, :, 1:-1, 1:-1].float()
                grads = per_map.unbind(2)
                x32 = x.float()
                u = torch.tanh(x32) if ctx.normalization == "tanh" else x32
                chain = _polynomial_derivative_sum(u, ctx.coefficients, grads[1:])
                if ctx.normalization == "tanh":  # d tanh = 1 - tanh^2
                    chain = chain - chain * u * u
                grad_x = (grads[0] + chain).to(x.dtype).contiguous(memory_format=_memory_format(x))
        return grad_x, grad_weight, grad_bias, None, None, None


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
        out = _PolynomialFeatureConv.apply(x.to(dtype), weight.to(dtype), bias.to(dtype), self.stride,
                                           self.coefficients, self.normalization)
        if self.n_convs > 1:  # grouped conv is channel-major (c*K + k); the block expects kernel-major
            out = out.unflatten(1, (self.channels, self.n_convs)).transpose(1, 2).flatten(1, 2)
            out = out.contiguous(memory_format=_memory_format(x))
        return out

    def extra_repr(self) -> str:
        return (f"{self.channels}, degree={self.degree}, stride={self.stride}, n_convs={self.n_convs}, "
                f"polynomial={self.polynomial!r}, normalization={self.normalization!r}, per_channel={self.per_channel}")
