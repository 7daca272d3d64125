"""`rkan-dist` with every trained micro-batch's sample ids recorded: `<out>/rank<R>.jsonl`.

    [torchrun --nproc_per_node N] sample_trace.py OUT_DIR train --config C [overrides ...]

The train loader's `batches` is wrapped to note the ids of the batch it yields (its planned
order, which is what FFCV reads), and the Trainer's forward records them when it trains on that
batch, with the epoch, the data position and the Slurm restart count. Nothing else changes: the
command is rkan_dist.cli's. `install` is the same for processes started otherwise (Slurm tasks:
tests/slurm/trace_site).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from rkan_dist import cli


def install(out: Path, rank: str) -> None:
    """Record this process's trained samples in `<out>/rank<rank>.jsonl` (appended, a line each)."""
    from rkan_dist.data.ffcv_loaders import FFCVTrainLoader
    from rkan_dist.trainer import Trainer

    out.mkdir(parents=True, exist_ok=True)
    trace = open(out / f"rank{rank}.jsonl", "a", buffering=1)  # noqa: SIM115
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    batches, forward = FFCVTrainLoader.batches, Trainer._forward_loss

    def traced_batches(self, epoch, start_sample=0):
        order = self.shard(epoch, start_sample)
        for index, batch in enumerate(batches(self, epoch, start_sample)):
            self.current_ids = order[index * self.batch_size:(index + 1) * self.batch_size].tolist()
            yield batch

    def traced_forward(self, images, labels):
        trace.write(json.dumps({"epoch": self.state.epoch, "position": self.state.epoch_sample,
                                "step": self.state.global_step, "world_size": self.dist.world_size,
                                "restart": restart, "ids": self.train_loader.current_ids}) + "\n")
        return forward(self, images, labels)

    FFCVTrainLoader.batches, Trainer._forward_loss = traced_batches, traced_forward


def main() -> int:
    install(Path(sys.argv[1]), os.environ.get("RANK", "0"))
    return cli.main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
