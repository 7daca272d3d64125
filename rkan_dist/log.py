"""Standard-library logging, prefixed with the rank; INFO on rank 0, WARNING elsewhere by default."""

from __future__ import annotations

import logging
import os
import sys


def current_rank() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def setup_logging(level: str = "INFO", rank: int | None = None) -> None:
    """Configure the root handler once per process; safe to call again (it replaces the handler)."""
    rank = current_rank() if rank is None else rank
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(logging.WARNING, logging.getLevelName(level)))
    # DeepSpeed and others attach their own handlers; keep their noise at our level.
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
