"""Which numeric precision a run trains in: `train.precision: auto` picks the one the hardware is fast at.

bf16 autocast is only a speed-up where the hardware computes in bf16. On a CPU whose oneDNN has
no native bf16 path (AVX2-only: no AVX512_BF16, no AMX) every bf16 convolution is emulated:
the demo measured 21-23 s per step in bf16 against 0.7 s in fp32 on a 2-core AVX2 EPYC. The rule:

- CUDA: bf16 where the device supports it (Ampere and newer), else fp16 with loss scaling;
- CPU: bf16 where oneDNN has native bf16 (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`), else fp32.

`resolve_precision` is a pure function of the request and the two capability probes below
(tests patch the probes). The trainer logs its answer and reason in the line that opens a run,
writes the concrete precision into the run's config.yaml, and TensorBoard's text tab.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
CHOICES = ("auto", *PRECISIONS)


def cpu_has_native_bf16() -> bool:
    """oneDNN computes bf16 natively on this CPU (AVX512_BF16 or AMX), rather than emulating it."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def cpu_capability() -> str:
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


def cuda_supports_bf16(device: Any) -> bool:
    import torch

    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def _device_type(device: Any) -> str:
    return getattr(device, "type", None) or str(device).split(":")[0]


def resolve_precision(requested: str, device: Any, backend: str = "ddp") -> tuple[str, str]:
    """(the precision to train in, why): `requested` is train.precision, `device` a torch.device
    (or 'cpu' / 'cuda:0'). Raises ValueError for a combination that cannot run."""
    if requested not in CHOICES:
        raise ValueError(f"train.precision={requested!r} is not valid; choose one of {', '.join(CHOICES)}")
    on_cuda = _device_type(device) == "cuda"
    if requested == "fp16" and not on_cuda and backend == "deepspeed":
        raise ValueError("train.precision=fp16 with parallel.backend=deepspeed needs CUDA (DeepSpeed's fp16 optimizer "
                         "has no CPU path); use train.precision=auto, bf16 or fp32 on CPU")
    if requested != "auto":
        return requested, "set by train.precision"
    if on_cuda:
        if cuda_supports_bf16(device):
            return "bf16", "auto: this CUDA device computes in bf16"
        return "fp16", "auto: this CUDA device has no bf16, so fp16 with loss scaling"
    if cpu_has_native_bf16():
        return "bf16", f"auto: oneDNN has native bf16 on this CPU ({cpu_capability()})"
    return "fp32", (f"auto: oneDNN has no native bf16 on this CPU ({cpu_capability()}), where bf16 is emulated "
                    "and slower than fp32")


def slow_precision_warning(precision: str, device: Any) -> str | None:
    """The warning for an explicit precision that runs, but slowly, on this hardware (None if fine)."""
    if _device_type(device) == "cuda":
        return None
    if precision == "bf16" and not cpu_has_native_bf16():
        return (f"train.precision=bf16 on a CPU without native bf16 in oneDNN ({cpu_capability()}): bf16 is "
                "emulated here and will be slow (the demo: ~30x fp32's step time); train.precision=auto picks fp32")
    if precision == "fp16":
        return "train.precision=fp16 on CPU is emulated and slow; train.precision=auto picks the fast one"
    return None


__all__ = ["CHOICES", "PRECISIONS", "cpu_has_native_bf16", "resolve_precision", "slow_precision_warning"]


def separate_inductor_cache_per_cpu(env: MutableMapping[str, str] = os.environ) -> str:
    """Point torch.compile's cache at a folder of this CPU's instruction set (AVX512, AVX2, ...) and
    return it. torch 2.14 does not key the compiled CPU code it caches by instruction set: code an
    AVX2 process cached and an AVX-512 process reused gave gradients 2,700x off, the other way NaN
    (docs/MEASURED.md). A cache on a shared file system, or one node run at both (the AVX2 test
    lane), would hand one the other's code. The user's TORCHINDUCTOR_CACHE_DIR stays the parent."""
    import torch
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    capability = torch.backends.cpu.get_cpu_capability()
    base = env.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    if os.path.basename(os.path.normpath(base)) != f"cpu-{capability}":  # not already this CPU's
        base = os.path.join(base, f"cpu-{capability}")
    env["TORCHINDUCTOR_CACHE_DIR"] = base
    return base
