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


class CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not the one at set-up.

    A Trainer built while stderr was redirected (a notebook cell's capture, pytest's capsys,
    contextlib.redirect_stderr) would otherwise keep writing into that stream after it closed; every
    later record, some from finalizers during garbage collection, then fails with "--- Logging error
    ---" and a traceback, and on Python 3.11 formatting that traceback inside a collection that
    interrupted an ast.parse (Triton's interpreter parses each kernel) raises SystemError in the
    parse (CPython 3.11 keeps one interpreter-wide AST recursion counter; cf. gh-95185, gh-106905)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it; the property ignores it
        pass


def setup_logging(level: str = "INFO", rank: int | None = None) -> None:
    """Configure the root handler once per process; safe to call again (it replaces the handler)."""
    rank = current_rank() if rank is None else rank
    handler = CurrentStderrHandler()
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if rank == 0 else max(logging.WARNING, logging.getLevelName(level)))
    # DeepSpeed and others attach their own handlers; keep their noise at our level.
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
