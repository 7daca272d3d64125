"""Triton kernels of the fused KAN convolution (CUDA; CPU tensors under TRITON_INTERPRET=1).

The same numbers as `kan_conv`'s grouped convolution over the polynomial feature maps, without
the feature maps ever reaching memory: the kernels read x (and grad_out) and write the output
(and grad_x plus a few rows of per-program weight-gradient partials), nothing else.

Forward, one program per (tile of BLOCK_P output pixels, block of BLOCK_C channels): for each of
the 9 taps it loads the shifted input tile (channels innermost, so a channels_last tensor is read
in contiguous rows; the 9 shifted loads of neighbouring pixels hit L1/L2, so DRAM sees the tile
and its halo once), evaluates tanh and the polynomial recurrence in fp32 registers and
accumulates the (d+1) per-tap weights, for every one of the K kernels.

Backward, one program per (chunk of input-pixel tiles, channel block), input-centred: tanh, the
features P_n(u) and their derivatives P_n'(u) are computed once per input pixel; for each tap it
loads the output gradient of the output pixel that tap reaches (masked when there is none) and
accumulates grad_x = sum_k,t g * (w0 + (1 - u^2) sum_n w_n P_n'(u)) and, in loop-carried
registers, the weight-gradient sums g * feature_f and g * 1. Each program writes its sums once,
as one row of `partials`; torch sums the rows (deterministic: no atomics). The taps that fall on
the zero padding are not visited by an input-centred loop; their weight gradient is
features(0) * (sum of all g - sum of g at the taps that land inside), which the "g * 1" sums
give (at the centre tap every output pixel lands inside, so that sum is also the bias gradient).

The kernels are defined when this module is imported: Triton reads TRITON_INTERPRET at that
moment (set it before the import to run them on CPU tensors, as the tests do). They call no
@triton.jit function of Triton's own library (tl.sum, tl.cdiv, tl.zeros are such functions, made when
triton is imported), so reloading this module switches them between compiled and interpreted
even after triton was imported in the other mode.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

TAPS = 9
_TAPS = tl.constexpr(TAPS)  # the kernels may read only constexpr globals


@triton.jit
def _tanh(x):
    """kan_conv_cpu's rational tanh (Eigen's / XLA's fp32 tanh, max error 3.4e-7): pure arithmetic, so it
    also runs in the interpreter (libdevice calls do not). Clamped at +-7.905 (tanh rounds to +-1 there)."""
    x = tl.where(x > 7.90531110763549805, 7.90531110763549805, tl.where(x < -7.90531110763549805, -7.90531110763549805, x))
    x2 = x * x
    p = -2.76076847742355e-16 * x2 + 2.00018790482477e-13
    p = p * x2 + -8.60467152213735e-11
    p = p * x2 + 5.12229709037114e-08
    p = p * x2 + 1.48572235717979e-05
    p = p * x2 + 6.37261928875436e-04
    p = p * x2 + 4.89352455891786e-03
    q = 1.19825839466702e-06 * x2 + 1.18534705686654e-04
    q = q * x2 + 2.26843463243900e-03
    q = q * x2 + 4.89352518554385e-03
    return x * p / q


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _features(x, rec_ptr, F: tl.constexpr, USE_TANH: tl.constexpr):
    """(x, P_1(u), ..., P_d(u)) and u, by the recurrence P_{n+1} = (A_n u + B_n) P_n - C_n P_{n-1}."""
    u = _tanh(x) if USE_TANH else x
    features = (x,)
    if F > 1:
        current = tl.load(rec_ptr) * u + tl.load(rec_ptr + 1)
        features = features + (current,)
        previous = current * 0.0 + 1.0
        for n in tl.static_range(1, F - 1):
            following = ((tl.load(rec_ptr + 3 * n) * u + tl.load(rec_ptr + 3 * n + 1)) * current
                         - tl.load(rec_ptr + 3 * n + 2) * previous)
            features = features + (following,)
            previous = current
            current = following
    return features, u


@triton.jit
def _derivatives(u, features, rec_ptr, F: tl.constexpr):
    """(P_1'(u), ..., P_d'(u)): P'_{n+1} = A_n P_n + (A_n u + B_n) P'_n - C_n P'_{n-1}, P_0' = 0."""
    current = u * 0.0 + tl.load(rec_ptr)
    derivatives = (current,)
    previous = u * 0.0
    for n in tl.static_range(1, F - 1):
        a = tl.load(rec_ptr + 3 * n)
        following = (a * features[n] + (a * u + tl.load(rec_ptr + 3 * n + 1)) * current
                     - tl.load(rec_ptr + 3 * n + 2) * previous)
        derivatives = derivatives + (following,)
        previous = current
        current = following
    return derivatives


@triton.jit
def _kan_conv_forward_kernel(x_ptr, w_ptr, bias_ptr, rec_ptr, out_ptr,
                             n_pixels, C, H, W, Ho, Wo,
                             sxb, sxc, sxh, sxw, sob, soc, soh, sow,
                             K: tl.constexpr, F: tl.constexpr, STRIDE: tl.constexpr, USE_TANH: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, k*C + c, i, j] = bias[k, c] + sum_t sum_f w[k, t, f, c] * feature_f(x at tap t)."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask, c_mask = p < n_pixels, c < C
    j = p % Wo
    i = (p // Wo) % Ho
    b = (p // (Ho * Wo)).to(tl.int64)
    accumulators = ()
    for k in tl.static_range(K):
        bias = tl.load(bias_ptr + k * C + c, mask=c_mask, other=0.0)
        accumulators = accumulators + (tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32) + bias[None, :],)
    for t in range(_TAPS):  # a loop, not unrolled: unrolled, every tap's weights are loaded up front
        h = i * STRIDE + (t // 3 - 1)
        w = j * STRIDE + (t % 3 - 1)
        inside = p_mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        offsets = b * sxb + h * sxh + w * sxw  # the zero padding loads as 0 and goes through tanh
        x = tl.load(x_ptr + offsets[:, None] + c[None, :] * sxc, mask=inside[:, None] & c_mask[None, :],
                    other=0.0).to(tl.float32)
        features, u = _features(x, rec_ptr, F, USE_TANH)
        updated = ()
        for k in tl.static_range(K):
            acc = accumulators[k]
            for f in tl.static_range(F):
                weight = tl.load(w_ptr + ((k * _TAPS + t) * F + f) * C + c, mask=c_mask, other=0.0)
                acc += features[f] * weight[None, :]
            updated = updated + (acc,)
        accumulators = updated
    out_offsets = b * sob + i * soh + j * sow
    mask = p_mask[:, None] & c_mask[None, :]
    for k in tl.static_range(K):
        tl.store(out_ptr + out_offsets[:, None] + (k * C + c)[None, :] * soc,
                 accumulators[k].to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kan_conv_backward_kernel(x_ptr, go_ptr, w_ptr, rec_ptr, gx_ptr, partials_ptr,
                              n_pixels, C, H, W, Ho, Wo, n_chunks,
                              sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw,
                              K: tl.constexpr, F: tl.constexpr, STRIDE: tl.constexpr, USE_TANH: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """grad_x, and partials[chunk, k, t, f, c] = sum over this chunk's pixels of g * feature_f
    (f < F) and g (f = F) at the taps that land inside the image."""
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    sums = ()
    for _ in tl.static_range(K * _TAPS * (F + 1)):
        sums = sums + (tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32),)
    for tile in range(chunk, (n_pixels + BLOCK_P - 1) // BLOCK_P, n_chunks):
        p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
        p_mask = p < n_pixels
        mask = p_mask[:, None] & c_mask[None, :]
        w = p % W
        h = (p // W) % H
        b = (p // (H * W)).to(tl.int64)
        x = tl.load(x_ptr + (b * sxb + h * sxh + w * sxw)[:, None] + c[None, :] * sxc, mask=mask,
                    other=0.0).to(tl.float32)
        features, u = _features(x, rec_ptr, F, USE_TANH)
        if F > 1:
            derivatives = _derivatives(u, features, rec_ptr, F)
        if USE_TANH:
            du = 1.0 - u * u
        grad_x = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
        updated = ()
        for k in tl.static_range(K):
            for t in tl.static_range(_TAPS):
                # the output pixel (i, j) whose tap t reads input pixel (h, w): h = STRIDE*i + t//3 - 1
                hs = h + (1 - t // 3)
                ws = w + (1 - t % 3)
                i = hs // STRIDE
                j = ws // STRIDE
                reached = p_mask & (hs >= 0) & (ws >= 0) & (i < Ho) & (j < Wo)
                if STRIDE > 1:
                    reached = reached & (hs % STRIDE == 0) & (ws % STRIDE == 0)
                g = tl.load(go_ptr + (b * sgb + i * sgh + j * sgw)[:, None] + (k * C + c)[None, :] * sgc,
                            mask=reached[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
                row = w_ptr + (k * _TAPS + t) * F * C + c
                slope = tl.full([BLOCK_P, BLOCK_C], 0.0, tl.float32)
                for n in tl.static_range(1, F):
                    slope += tl.load(row + n * C, mask=c_mask, other=0.0)[None, :] * derivatives[n - 1]
                if USE_TANH:
                    slope = slope * du
                grad_x += g * (slope + tl.load(row, mask=c_mask, other=0.0)[None, :])
                for f in tl.static_range(F):
                    updated = updated + (sums[(k * _TAPS + t) * (F + 1) + f] + g * features[f],)
                updated = updated + (sums[(k * _TAPS + t) * (F + 1) + F] + g,)
        sums = updated
        tl.store(gx_ptr + (b * sdb + h * sdh + w * sdw)[:, None] + c[None, :] * sdc,
                 grad_x.to(gx_ptr.dtype.element_ty), mask=mask)
    for index in tl.static_range(K * _TAPS * (F + 1)):
        tl.store(partials_ptr + (chunk * (K * _TAPS * (F + 1)) + index) * C + c, tl.reduce(sums[index], 0, _add),
                 mask=c_mask)


INTERPRETED = isinstance(_kan_conv_forward_kernel, InterpretedFunction)


def check_device(device_type: str, dtype: torch.dtype) -> None:
    """CUDA tensors, or CPU tensors under the interpreter; fp32/bf16/fp16 (fp32 inside)."""
    if device_type == "cpu" and not INTERPRETED:
        raise RuntimeError("the triton KAN conv needs CUDA tensors; on CPU it runs only under Triton's interpreter "
                           "(TRITON_INTERPRET=1 set before rkan_dist.models.kan_conv_triton is imported)")
    if device_type not in ("cuda", "cpu"):
        raise RuntimeError(f"the triton KAN conv runs on CUDA tensors, got {device_type}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RuntimeError(f"the triton KAN conv computes in fp32 for fp32/bf16/fp16 inputs, got {dtype}")


def _launch(kernel, grid, *args, **meta) -> None:
    """Every kernel launch goes through here (tests wrap it to tell kernel writes from torch ops)."""
    kernel[grid](*args, **meta)


# The per-family constants are made on the device once per (device, polynomial family and degree)
# and kept: torch.tensor(..., device="cuda") copies from pageable host memory and waits for the
# stream, so made per call it would stall the CPU that queues the kernels once per layer and step.
# The cached tensors are only read.

@functools.cache
def _recurrences(coefficients: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(A_n, B_n, C_n) flattened, fp32, on the device: read as scalars by the kernels."""
    return torch.tensor(coefficients or (0.0,), dtype=torch.float32, device=device)


@functools.cache
def _features_of_zero(border: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """The features of 0 (what the zero padding contributes to each tap), fp32, on the device."""
    return torch.tensor(border, dtype=torch.float32, device=device)


@functools.cache
def _program_target(device: torch.device) -> int:
    """Programs to aim for: a few per SM keeps every SM busy (the interpreter: a handful)."""
    if device.type != "cuda":
        return 2  # the interpreter: two chunks, so that the partial rows and the tile loop are exercised
    return 8 * torch.cuda.get_device_properties(device).multi_processor_count


def _kernel_weights(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Grouped-conv weight [C*K, F, 3, 3] (index c*K + k) -> [K, 9, F, C] fp32, channels innermost."""
    n_features = weight.shape[1]
    return weight.detach().float().reshape(channels, -1, n_features, TAPS).permute(1, 3, 2, 0).contiguous()


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, stride: int, coefficients: tuple[float, ...],
            use_tanh: bool) -> torch.Tensor:
    """[B, K*C, Ho, Wo] kernel-major, in x's dtype and memory format. `coefficients`: (A_n, B_n, C_n) flat."""
    check_device(x.device.type, x.dtype)
    batch, channels, height, width = x.shape
    kernels, n_features = weight.shape[0] // channels, weight.shape[1]
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    weights = _kernel_weights(weight, channels)
    bias_kc = bias.detach().float().reshape(channels, kernels).t().contiguous()
    out = torch.empty((batch, kernels * channels, out_h, out_w), dtype=x.dtype, device=x.device,
                      memory_format=_memory_format(x))
    n_pixels = batch * out_h * out_w
    block_c = min(64, max(16, triton.next_power_of_2(channels)))
    block_p = 64 if INTERPRETED else 16  # the interpreter's cost is per operation, not per element
    grid = (triton.cdiv(n_pixels, block_p), triton.cdiv(channels, block_c))
    _launch(_kan_conv_forward_kernel, grid, x, weights, bias_kc, _recurrences(coefficients, x.device), out,
            n_pixels, channels, height, width, out_h, out_w, *x.stride(), *out.stride(),
            K=kernels, F=n_features, STRIDE=stride, USE_TANH=use_tanh, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=4)
    return out


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int,
             coefficients: tuple[float, ...], use_tanh: bool, border: tuple[float, ...]):
    """(grad_x, grad_weight [C*K, F, 3, 3], grad_bias [C*K]); `border` = the features of 0 (the padding)."""
    check_device(x.device.type, x.dtype)
    batch, channels, height, width = x.shape
    kernels, n_features = weight.shape[0] // channels, weight.shape[1]
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    weights = _kernel_weights(weight, channels)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    n_pixels = batch * height * width
    # 4 x 32 pixels x channels over 4 warps: one element per thread for each of the K*9*(F+1)
    # loop-carried sums (offline sm_90 builds, bf16: 158-168 registers at K=1, d=2..3, 255 without
    # spills at d=6 or K=2 with d=2; K=2 with d=6 spills). The interpreter takes 32 pixels: its
    # cost is per operation, not per element.
    block_c = min(32, max(16, triton.next_power_of_2(channels)))
    block_p = 32 if INTERPRETED else 4
    channel_blocks = triton.cdiv(channels, block_c)
    n_chunks = max(1, min(triton.cdiv(n_pixels, block_p), _program_target(x.device) // channel_blocks))
    partials = torch.empty((n_chunks, kernels, TAPS, n_features + 1, channels), dtype=torch.float32,
                           device=x.device)
    _launch(_kan_conv_backward_kernel, (n_chunks, channel_blocks), x, grad_out, weights,
            _recurrences(coefficients, x.device), grad_x, partials,
            n_pixels, channels, height, width, out_h, out_w, n_chunks,
            *x.stride(), *grad_out.stride(), *grad_x.stride(),
            K=kernels, F=n_features, STRIDE=stride, USE_TANH=use_tanh, BLOCK_P=block_p, BLOCK_C=block_c,
            num_warps=4)
    inside = partials.sum(0)  # [K, 9, F+1, C]
    grad_bias = inside[:, TAPS // 2, n_features]  # the centre tap reaches every output pixel: sum of g
    # the taps that fell on the padding saw the features of 0: their g is what the inside sums missed
    outside = grad_bias[:, None, :] - inside[:, :, n_features]
    features_of_zero = _features_of_zero(border, x.device)
    grad_taps = torch.addcmul(inside[:, :, :n_features], outside[:, :, None, :], features_of_zero[None, None, :, None])
    grad_weight = grad_taps.permute(3, 0, 2, 1).reshape(weight.shape).to(weight.dtype)
    return grad_x, grad_weight, grad_bias.t().reshape(-1).to(weight.dtype)

