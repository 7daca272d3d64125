"""Fused KANConv2d vs the reference code's unfold formulation, at RKANet-50 stage-4 shapes.

    python -m bench.kan_conv [--quick] [--json FILE]

Forward+backward time: median of interleaved repeats after a warm-up, both implementations
in the same process. Memory: bytes autograd saves for backward (distinct storages, via
saved_tensors_hooks) plus the forward output - the part of peak memory a training step holds
from forward to backward; CPU has no peak allocator counter to read instead.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from bench.common import bench_main, saved_storages
from rkan_dist.models.kan_conv import KANConv2d, polynomial_maps

# (label, channels, spatial size, stride, degree): RKANet-50's two KAN convolutions
CASES = (("a: 512ch 14x14 s2 d3", 512, 14, 2, 3), ("b: 2048ch 7x7 s1 d2", 2048, 7, 1, 2))


def unfold_kan_conv(x: torch.Tensor, conv: KANConv2d) -> torch.Tensor:
    """The reference code's way: unfold 3x3 patches, then a KAN layer on every 9-vector."""
    batch, channels, height, width = x.shape
    patches = F.unfold(x, kernel_size=3, padding=1, stride=conv.stride).view(batch, channels, 9, -1)
    basis = [torch.ones_like(patches), *polynomial_maps(torch.tanh(patches), conv.coefficients)]
    basis = torch.stack(basis, dim=-1)  # [B, C, 9, L, d+1]: the 9*(d+1)-times-larger tensor
    outputs = []
    for k in range(conv.n_convs):
        base = torch.einsum("bctl,t->bcl", patches, conv.base_weight[k])
        poly = torch.einsum("bctln,tn->bcl", basis, conv.poly_weight[k] * conv.scaler[k][:, None])
        outputs.append(base + poly)
    size = (height - 1) // conv.stride + 1, (width - 1) // conv.stride + 1
    return torch.cat(outputs, dim=1).view(batch, channels * conv.n_convs, *size)


def held_bytes(fn, x: torch.Tensor, parameters) -> int:
    """Bytes saved for backward (distinct storages, parameters excluded) + the output."""
    out, saved = saved_storages(lambda: fn(x), parameters)
    saved[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    return sum(saved.values())


def step_seconds(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    out = fn(x)
    out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def run_case(label: str, channels: int, size: int, stride: int, degree: int, batch: int, repeats: int) -> dict:
    torch.manual_seed(0)
    conv = KANConv2d(channels, degree=degree, stride=stride)
    x = torch.randn(batch, channels, size, size, requires_grad=True)
    implementations = {"fused": conv, "unfold": lambda inp: unfold_kan_conv(inp, conv)}
    error = ((conv(x) - unfold_kan_conv(x, conv)).norm() / unfold_kan_conv(x, conv).norm()).item()
    for fn in implementations.values():  # warm-up, not timed
        step_seconds(fn, x)
    times = {name: [] for name in implementations}
    for _ in range(repeats):  # interleaved so both see the same machine load
        for name, fn in implementations.items():
            times[name].append(step_seconds(fn, x))
    medians = {name: statistics.median(values) for name, values in times.items()}
    memory = {name: held_bytes(fn, x, conv.parameters()) for name, fn in implementations.items()}
    return {"case": label, "batch": batch, "fused_ms": medians["fused"] * 1e3, "unfold_ms": medians["unfold"] * 1e3,
            "speedup": medians["unfold"] / medians["fused"], "fused_mib": memory["fused"] / 2**20,
            "unfold_mib": memory["unfold"] / 2**20, "memory_ratio": memory["unfold"] / memory["fused"],
            "relative_error": error}


SWEEP_CHANNELS = (64, 128, 256, 512)  # 14x14, stride 1, degree 3: time and memory against width


def run(quick: bool) -> dict:
    batch, repeats = (8, 3) if quick else (32, 7)
    torch.set_num_threads(torch.get_num_threads())
    cases = [run_case(*case, batch=batch, repeats=repeats) for case in CASES]
    sweep = [{"channels": channels, **run_case(f"{channels}ch 14x14 s1 d3", channels, 14, 1, 3, batch=8, repeats=3)}
             for channels in (SWEEP_CHANNELS[:2] if quick else SWEEP_CHANNELS)]
    print(f"KAN conv, fused vs unfold reference, CPU fp32, batch {batch}, median of {repeats} fwd+bwd "
          f"(memory = bytes saved for backward + output, via saved_tensors_hooks)")
    print(f"{'case':24} {'fused ms':>9} {'unfold ms':>10} {'speedup':>8} {'fused MiB':>10} {'unfold MiB':>11} {'mem ratio':>10} {'rel err':>9}")
    for c in cases:
        print(f"{c['case']:24} {c['fused_ms']:9.1f} {c['unfold_ms']:10.1f} {c['speedup']:8.2f} {c['fused_mib']:10.1f} "
              f"{c['unfold_mib']:11.1f} {c['memory_ratio']:10.2f} {c['relative_error']:9.1e}")
    return {"quick": quick, "device": "cpu", "threads": torch.get_num_threads(), "cases": cases, "sweep": sweep,
            # the worse of the two shapes, so the headline figure is never flattering
            "kan_conv_speedup": min(c["speedup"] for c in cases),
            "kan_conv_memory_ratio": min(c["memory_ratio"] for c in cases)}


def main(argv: list[str] | None = None) -> int:
    return bench_main(run, __doc__, 'batch 8, 3 repeats (under a minute)', argv)


if __name__ == "__main__":
    sys.exit(main())
