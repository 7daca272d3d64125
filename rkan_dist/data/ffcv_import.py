"""FFCV's import, which resets torch's thread count; its own module so that the writer, the loaders
and the package can all call it without importing one another."""

from __future__ import annotations

import sys


def import_ffcv() -> None:
    """Import FFCV keeping torch's intra-op thread count: importing ffcv.pipeline.compiler sets it to
    1 for the whole process (a module-level Compiler.set_num_threads(1)). The loaders call this first."""
    if "ffcv.pipeline.compiler" in sys.modules:
        return
    import torch

    threads = torch.get_num_threads()
    import ffcv.pipeline.compiler  # noqa: F401

    torch.set_num_threads(threads)
