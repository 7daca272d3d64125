"""CPU kernels of the fused KAN convolution: the polynomial maps and the 3x3 taps in one pass.

On CPU, oneDNN runs a grouped convolution with (d+1) inputs and one output per group far below
its dense speed (a group is too small to vectorise), and most of its time goes to writing and
re-reading the (d+1)-times-larger feature maps. These numba kernels instead split the work into
tasks of (image, block of channels). A task fills a small buffer with its block's padded feature
maps, channels innermost, which stays in cache while the 9 taps are summed into the output: the
innermost loop of every tap runs over the channel block, so it vectorises whether the taps are
shared by all channels or per channel. The backward recomputes the maps from the saved input,
accumulates each task's weight gradient in its own slot (no locks; the caller sums the slots)
and applies the chain rule through P_n(u) in the same task.

Arguments (F = d+1 features: 0 is x itself, n = 1..d is P_n(u); K kernels):
x, grad_x [B, C, H, W] contiguous (u = tanh(x), or x with use_tanh False, is made per task);
weight [K, 9, F, C]; bias [K, C]; out, grad_out [B, K*C, Ho, Wo], channel k*C + c (kernel-major, the
KAN conv op's order); recurrences [d, 3] holds (A_n, B_n, C_n) of P_{n+1} = (A_n u + B_n) P_n
- C_n P_{n-1}, P_0 = 1; border [F] = the features of 0, the zero padding's (padding comes before
tanh); grad_weight_per_image [B, K, 9, F, C].
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

CHANNEL_BLOCK = 64  # 4 features x 16x16 padded x 64 channels x 4 B = 256 KiB per buffer: fits L2


# Fused multiply-add only: full fastmath would assume no NaN/inf, and a NaN must come out as NaN
# so that a diverging run is caught by the trainer's non-finite check
_FAST = {"contract"}
# float32 constants: a Python float would promote the fp32 loops to fp64
_ZERO, _ONE = np.float32(0.0), np.float32(1.0)
# tanh(x) ~ x P(x^2) / Q(x^2) on x clamped to +-7.905 (beyond it tanh rounds to +-1 in fp32): the
# rational approximation of Eigen's and XLA's fp32 tanh (coefficients lowest power first). Max
# error 3.4e-7 absolute and relative over all of fp32; pure arithmetic, so the loops vectorise,
# where numba's libm tanh is a scalar call per element (5x slower than this whole kernel's taps).
_TANH_CLAMP = np.float32(7.90531110763549805)
_TANH_P = tuple(np.float32(c) for c in (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
                                        5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13,
                                        -2.76076847742355e-16))
_TANH_Q = tuple(np.float32(c) for c in (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04,
                                        1.19825839466702e-06))


@njit(cache=True, fastmath=_FAST, error_model="numpy", inline="always")
def _tanh(x):
    x = _TANH_CLAMP if x > _TANH_CLAMP else (-_TANH_CLAMP if x < -_TANH_CLAMP else x)  # NaN stays NaN
    x2 = x * x
    p = ((((((_TANH_P[6] * x2 + _TANH_P[5]) * x2 + _TANH_P[4]) * x2 + _TANH_P[3]) * x2 + _TANH_P[2]) * x2
          + _TANH_P[1]) * x2 + _TANH_P[0])
    q = ((_TANH_Q[3] * x2 + _TANH_Q[2]) * x2 + _TANH_Q[1]) * x2 + _TANH_Q[0]
    return x * p / q


def task_count(batch: int, channels: int) -> int:
    """Tasks of a call: (image, block of CHANNEL_BLOCK channels) pairs."""
    return batch * -(-channels // min(CHANNEL_BLOCK, channels))


_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
CHUNKS_PER_THREAD = 4


def run_tasks(kernel, n_tasks: int, *args) -> None:
    """kernel(first_task, end_task, *args) over all tasks, on torch's thread count.

    Plain Python threads over GIL-free kernels rather than numba's own parallel loops (whose
    TBB/OpenMP workers keep spinning after a kernel and fight torch's for the cores), taking
    chunks of tasks from a shared queue: torch's OpenMP workers spin for a few ms after each
    parallel op, so a static split would wait for whichever thread shares its core with one.
    """
    global _pool, _pool_workers
    threads = max(1, min(torch.get_num_threads(), n_tasks))
    if threads == 1:
        kernel(0, n_tasks, *args)
        return
    if _pool_workers < threads - 1:
        _pool_workers = max(threads - 1, (os.cpu_count() or 2) - 1)
        _pool = ThreadPoolExecutor(max_workers=_pool_workers, thread_name_prefix="kan-conv")
    n_chunks = min(n_tasks, threads * CHUNKS_PER_THREAD)
    bounds = [n_tasks * i // n_chunks for i in range(n_chunks + 1)]
    chunks = iter(range(n_chunks))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                chunk = next(chunks, None)
            if chunk is None:
                return
            kernel(bounds[chunk], bounds[chunk + 1], *args)

    helpers = [_pool.submit(work) for _ in range(threads - 1)]
    work()
    for helper in helpers:
        helper.result()


@njit(cache=True, fastmath=_FAST, error_model="numpy", inline="always")
def _load_block(x, b, c0, use_tanh, x_block, u_block):
    """x_block[h, w, cc] = x[b, c0 + cc, h, w] (one task's channels, channels innermost), u = tanh x."""
    height, width, size = x_block.shape
    for cc in range(size):
        for h in range(height):
            for w in range(width):
                x_block[h, w, cc] = x[b, c0 + cc, h, w]
    for h in range(height):
        for w in range(width):
            for cc in range(size):
                u_block[h, w, cc] = _tanh(x_block[h, w, cc]) if use_tanh else x_block[h, w, cc]


@njit(cache=True, fastmath=_FAST, error_model="numpy", inline="always")
def _fill_features(x_block, u_block, recurrences, border, features):
    """features[1+h, 1+w, f, :] = feature f of x_block[h, w, :]; the 1-pixel border = maps of 0.

    Loops over the channel block without branches, so each vectorises; the recurrence reads
    P_{n-1} and P_n back from the buffer.
    """
    padded_h, padded_w, n_features, size = features.shape
    for h in range(padded_h):
        for w in range(padded_w):
            if 0 < h < padded_h - 1 and 0 < w < padded_w - 1:
                continue
            for f in range(n_features):
                for cc in range(size):
                    features[h, w, f, cc] = border[f]
    for h in range(padded_h - 2):
        for w in range(padded_w - 2):
            for cc in range(size):
                features[h + 1, w + 1, 0, cc] = x_block[h, w, cc]
            if n_features > 1:
                a, bb = recurrences[0, 0], recurrences[0, 1]
                for cc in range(size):
                    features[h + 1, w + 1, 1, cc] = a * u_block[h, w, cc] + bb
            if n_features > 2:  # P_{n-1} = P_0 = 1
                a, bb, cn = recurrences[1, 0], recurrences[1, 1], recurrences[1, 2]
                for cc in range(size):
                    features[h + 1, w + 1, 2, cc] = (a * u_block[h, w, cc] + bb) * features[h + 1, w + 1, 1, cc] - cn
            for n in range(2, n_features - 1):
                a, bb, cn = recurrences[n, 0], recurrences[n, 1], recurrences[n, 2]
                for cc in range(size):
                    features[h + 1, w + 1, n + 1, cc] = ((a * u_block[h, w, cc] + bb) * features[h + 1, w + 1, n, cc]
                                                         - cn * features[h + 1, w + 1, n - 1, cc])


@njit(cache=True, fastmath=_FAST, error_model="numpy", inline="always")
def _task_block(task, x, n_features, recurrences, use_tanh, border):
    """A task's image b, first channel c0, and its blocks (channels innermost): x, u = tanh x, and
    the padded feature maps."""
    batch, channels, height, width = x.shape
    block = min(CHANNEL_BLOCK, channels)
    n_blocks = (channels + block - 1) // block  # task = b * n_blocks + block index
    b, c0 = task // n_blocks, (task % n_blocks) * block
    size = min(block, channels - c0)
    x_block, u_block = np.empty((height, width, size), x.dtype), np.empty((height, width, size), x.dtype)
    features = np.empty((height + 2, width + 2, n_features, size), x.dtype)
    _load_block(x, b, c0, use_tanh, x_block, u_block)
    _fill_features(x_block, u_block, recurrences, border, features)
    return b, c0, x_block, u_block, features


@njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def kan_conv_forward(first_task, end_task, x, weight, bias, stride, recurrences, use_tanh, border, out):
    kernels, taps, n_features, channels = weight.shape
    out_h, out_w = out.shape[2], out.shape[3]
    for task in range(first_task, end_task):
        b, c0, x_block, u_block, features = _task_block(task, x, n_features, recurrences, use_tanh, border)
        size = x_block.shape[2]
        taps_block = np.empty((taps, n_features, size), x.dtype)  # contiguous copies: the loops below
        bias_block = np.empty(size, x.dtype)                      # then see unit strides and vectorise
        total = np.empty(size, x.dtype)
        for k in range(kernels):
            taps_block[:] = weight[k, :, :, c0:c0 + size]
            bias_block[:] = bias[k, c0:c0 + size]
            for i in range(out_h):
                for j in range(out_w):
                    for cc in range(size):
                        total[cc] = bias_block[cc]
                    for t in range(taps):
                        h, w = stride * i + t // 3, stride * j + t % 3
                        for f in range(n_features):
                            for cc in range(size):
                                total[cc] += taps_block[t, f, cc] * features[h, w, f, cc]
                    for cc in range(size):
                        out[b, k * channels + c0 + cc, i, j] = total[cc]


@njit(nogil=True, cache=True, fastmath=_FAST, error_model="numpy")
def kan_conv_backward(first_task, end_task, x, grad_out, weight, stride, recurrences, use_tanh, border, grad_x,
                      grad_weight_per_image):
    height, width = x.shape[2], x.shape[3]
    kernels, taps, n_features, channels = weight.shape
    out_h, out_w = grad_out.shape[2], grad_out.shape[3]
    for task in range(first_task, end_task):
        b, c0, x_block, u_block, features = _task_block(task, x, n_features, recurrences, use_tanh, border)
        size = x_block.shape[2]
        grad_features = np.zeros((height + 2, width + 2, n_features, size), x.dtype)
        grad = np.empty((out_h, out_w, size), x.dtype)
        taps_block = np.empty((taps, n_features, size), x.dtype)
        grad_taps = np.empty((taps, n_features, size), x.dtype)
        derivatives = np.empty((n_features, size), x.dtype)
        if n_features > 1:  # P_1' = A_0 everywhere
            derivatives[1, :] = recurrences[0, 0]
        chain = np.empty(size, x.dtype)
        for k in range(kernels):
            for cc in range(size):  # this block's output gradient, channels innermost
                for i in range(out_h):
                    for j in range(out_w):
                        grad[i, j, cc] = grad_out[b, k * channels + c0 + cc, i, j]
            taps_block[:] = weight[k, :, :, c0:c0 + size]
            grad_taps[:] = 0.0
            for i in range(out_h):
                for j in range(out_w):
                    for t in range(taps):
                        h, w = stride * i + t // 3, stride * j + t % 3
                        for f in range(n_features):
                            for cc in range(size):
                                grad_features[h, w, f, cc] += taps_block[t, f, cc] * grad[i, j, cc]
                                grad_taps[t, f, cc] += grad[i, j, cc] * features[h, w, f, cc]
            grad_weight_per_image[b, k, :, :, c0:c0 + size] = grad_taps
        # chain rule: d feature_0 / dx = 1, d P_n(u) / dx = P_n'(u) du/dx, du/dx = 1 - u^2 (tanh),
        # P_n' by the differentiated recurrence P'_{n+1} = A_n P_n + (A_n u + B_n) P'_n - C_n P'_{n-1};
        # the result goes to x_block (no longer needed), then to grad_x
        for h in range(height):
            for w in range(width):
                for cc in range(size):
                    x_block[h, w, cc] = grad_features[h + 1, w + 1, 0, cc]
                if n_features > 2:
                    a, bb = recurrences[1, 0], recurrences[1, 1]
                    for cc in range(size):
                        derivatives[2, cc] = (a * features[h + 1, w + 1, 1, cc]
                                              + (a * u_block[h, w, cc] + bb) * derivatives[1, cc])
                for n in range(2, n_features - 1):
                    a, bb, cn = recurrences[n, 0], recurrences[n, 1], recurrences[n, 2]
                    for cc in range(size):
                        derivatives[n + 1, cc] = (a * features[h + 1, w + 1, n, cc]
                                                  + (a * u_block[h, w, cc] + bb) * derivatives[n, cc]
                                                  - cn * derivatives[n - 1, cc])
                for cc in range(size):
                    chain[cc] = _ZERO
                for n in range(1, n_features):
                    for cc in range(size):
                        chain[cc] += grad_features[h + 1, w + 1, n, cc] * derivatives[n, cc]
                if use_tanh:
                    for cc in range(size):
                        chain[cc] *= _ONE - u_block[h, w, cc] * u_block[h, w, cc]
                for cc in range(size):
                    x_block[h, w, cc] += chain[cc]
        for cc in range(size):
            for h in range(height):
                for w in range(width):
                    grad_x[b, c0 + cc, h, w] = x_block[h, w, cc]
