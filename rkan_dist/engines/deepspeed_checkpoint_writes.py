"""DeepSpeed's checkpoint writes, wrapped so that a write failing on one rank fails the save on
every rank instead of hanging them: a patch of DeepSpeed's private checkpoint engine.

`write_errors_held_back` replaces, for one save, the `save` and `makedirs` methods of the
engine's `checkpoint_engine` and the engine's `_copy_recovery_script`: which of its methods
DeepSpeed writes through is no public API, so it first checks that the installed DeepSpeed is
the release it was tested on (`TESTED`; see rkan_dist.upstream_versions).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from rkan_dist.upstream_versions import TestedRelease, require

TESTED = TestedRelease("deepspeed", "0.19.8", "the writes of its checkpoint engine",
                       "rkan_dist/engines/deepspeed_checkpoint_writes.py")


@contextlib.contextmanager
def write_errors_held_back(ds: Any) -> Iterator[list[BaseException]]:
    """For one DeepSpeed save: a write that fails on this rank (disk full, quota, permissions) is
    recorded in the yielded list and skips the rank's remaining writes, but not DeepSpeed's collectives.

    Raised inside save_checkpoint, it left the ranks that wrote their part in its final barrier and
    this rank in CheckpointManager's agreement (a different collective): measured on 2 CPU ranks
    under ZeRO-1, a hang until the watchdog fired, recorded as a hang of an unknown rank. Held back
    to the end, every rank leaves save_checkpoint, and the agreement fails the save on all of them.
    Wraps the checkpoint engine's save and makedirs (every shard and the model file go through
    them) and the recovery-script copy, DeepSpeed's one write of its own."""
    require(TESTED)
    errors: list[BaseException] = []

    def held_back(write):
        @functools.wraps(write)
        def attempt(*args: Any, **kwargs: Any) -> Any:
            if errors:  # this checkpoint is lost already: write nothing more of it
                return None
            try:
                return write(*args, **kwargs)
            except Exception as err:  # torch.save reports ENOSPC as a RuntimeError
                errors.append(err)
                return None
        return attempt

    wrapped = [(owner, name) for owner, name in ((ds.checkpoint_engine, "save"), (ds.checkpoint_engine, "makedirs"),
                                                 (ds, "_copy_recovery_script")) if hasattr(owner, name)]
    for owner, name in wrapped:
        setattr(owner, name, held_back(getattr(owner, name)))
    try:
        yield errors
    finally:
        for owner, name in wrapped:
            delattr(owner, name)  # the class's own method shows through again
