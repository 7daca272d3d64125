"""How many threads each process may run: compute (torch intra-op) plus data (FFCV's numba
decoders or DataLoader workers), so that all processes of a node together fit its cores.

Left alone, every process takes all of them: torch's intra-op pool and numba's pool are each
sized to the machine, so one Python process (the README's snippet) ran 22 threads on 2 cores,
and N torchrun workers run N times too many. `plan_threads` is the rule (pure, unit-tested);
`configure_threads` applies it once per process, from the launcher's environment, and is called
by everything that computes: the trainer (torchrun worker, Slurm task, Python API), eval,
export and the benchmarks.

The rule: the cores this process may run on (its affinity, capped by a cgroup CPU quota and by
Slurm's cpus-per-task) are shared equally by the node's local processes (torchrun's
LOCAL_WORLD_SIZE); each process's share goes first to `data.num_workers` data threads while
one core stays for compute, and the rest to compute. A share of one core still gets one thread
of each (FFCV cannot decode without a thread), which the log line says. OMP_NUM_THREADS, when
set, caps the compute threads (torchrun sets it to 1 for several local processes unless it is
set already; tests set it for runs that must repeat bitwise on any machine).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadPlan:
    cores: int  # cores this node's local processes share
    local_processes: int
    compute: int  # torch intra-op threads per process
    data: int  # data threads (FFCV/numba) or worker processes (folder) per process

    def describe(self) -> str:
        return (f"{self.cores} cores for {self.local_processes} local process(es): {self.compute} compute + "
                f"{self.data} data thread(s) each")


def plan_threads(cores: int, local_processes: int, num_workers: int, compute_cap: int | None = None) -> ThreadPlan:
    """Split `cores` over `local_processes`, giving each `num_workers` data threads where that
    leaves a core for compute (fewer where it does not, but at least one when any were asked for),
    and the rest, up to `compute_cap`, to compute."""
    local_processes = max(1, local_processes)
    share = max(1, cores // local_processes)
    data = min(num_workers, max(1, share - 1)) if num_workers > 0 else 0
    compute = max(1, share - data)
    if compute_cap is not None and compute_cap > 0:
        compute = min(compute, compute_cap)
    return ThreadPlan(max(1, cores), local_processes, compute, data)


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPU quota of this cgroup (v2 cpu.max, v1 cfs quota) in whole cores, or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 else None
    except (OSError, ValueError):
        return None


def available_cores(env: Mapping[str, str] = os.environ) -> int:
    """The cores this process may use: affinity, capped by a cgroup quota and Slurm's cpus-per-task."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, limit)
    slurm = env.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0 and "LOCAL_WORLD_SIZE" not in env:
        cores = min(cores, int(slurm))  # a Slurm task's own share (srun may not bind it)
    return max(1, cores)


def local_processes(env: Mapping[str, str] = os.environ) -> int:
    """How many processes of this job share this node's cores: torchrun's LOCAL_WORLD_SIZE (a
    Slurm task's cores are its own: cpus-per-task)."""
    value = env.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


_applied: ThreadPlan | None = None


def configure_threads(num_workers: int = 1, env: Mapping[str, str] = os.environ) -> ThreadPlan:
    """Apply `plan_threads` to this process: torch intra-op threads, numba's pool (sized before
    numba is imported, else capped), and the data thread count the loaders should use."""
    global _applied
    cap = env.get("OMP_NUM_THREADS", "")
    plan = plan_threads(available_cores(env), local_processes(env), num_workers,
                        compute_cap=int(cap) if cap.isdigit() else None)
    import sys

    if plan.data == 0:
        pass  # no data threads: numba's pool is left as it is (a benchmark may size it itself)
    elif "numba" not in sys.modules:
        # numba starts a pool of NUMBA_NUM_THREADS threads (default: every core) on first use
        os.environ["NUMBA_NUM_THREADS"] = str(plan.data)
    else:
        import numba

        numba.set_num_threads(min(plan.data, numba.config.NUMBA_NUM_THREADS))
    import torch

    torch.set_num_threads(plan.compute)
    if plan != _applied:
        log.info("threads: %s", plan.describe())
    _applied = plan
    return plan


__all__ = ["ThreadPlan", "available_cores", "configure_threads", "local_processes", "plan_threads"]
