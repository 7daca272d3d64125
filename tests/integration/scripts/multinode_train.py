"""One 'node' of a two-node job (torchrun --nnodes 2, c10d rendezvous): train a few DDP steps on
this rank's own data and save the final weights as OUT_DIR/rank<R>.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from engine_checks import batch, make_engine  # noqa: E402

from rkan_dist import distributed  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    info = distributed.init("cpu")
    try:
        engine = make_engine(info, "ddp")
        initial = engine.consolidated_state_dict()
        for step in range(4):
            images, labels = batch(step, info.rank)
            engine.backward(F.cross_entropy(engine.forward(images), labels))
            assert engine.step().applied
        torch.save({"initial": initial, "final": engine.consolidated_state_dict(), "world_size": info.world_size,
                    "rank": info.rank}, out / f"rank{info.rank}.pt")
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
