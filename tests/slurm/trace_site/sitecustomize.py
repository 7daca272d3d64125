"""On PYTHONPATH with RKAN_SAMPLE_TRACE=<folder>: every Slurm task of a job records the samples it
trains on, as tests/integration/scripts/sample_trace.py does for a command it starts itself.

A Slurm task's first import must stay rkan_dist.stops (it holds USR2 and SIGTERM until the task's
handlers are in), so nothing is imported here: a finder waits for rkan_dist.trainer, which the task
imports later, and installs the trace once it has loaded.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

_SCRIPTS = Path(__file__).resolve().parents[2] / "integration" / "scripts"


class _TraceOnceTrainerLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "rkan_dist.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        exec_module = spec.loader.exec_module

        def exec_then_trace(module):
            exec_module(module)
            sys.modules[name] = module  # sample_trace imports it by name
            sys.path.insert(0, str(_SCRIPTS))
            import sample_trace

            sample_trace.install(Path(os.environ["RKAN_SAMPLE_TRACE"]), os.environ.get("SLURM_PROCID", "0"))

        spec.loader.exec_module = exec_then_trace
        return spec


if os.environ.get("RKAN_SAMPLE_TRACE"):
    sys.meta_path.insert(0, _TraceOnceTrainerLoads())
