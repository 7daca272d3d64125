"""A function submitit's LocalExecutor runs in each task: join the group from submitit's env."""

from __future__ import annotations

import os

import torch

from rkan_dist import distributed


def join_and_reduce() -> dict:
    launcher = distributed.detect_launcher(os.environ)  # before init exports torchrun-style variables
    info = distributed.init("cpu")
    try:
        total = distributed.all_reduce_sum(torch.tensor([float(info.rank + 1)]))
        return {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
                "backend": info.backend, "sum": float(total.item()), "launcher": launcher,
                "master_port": int(os.environ["MASTER_PORT"])}
    finally:
        distributed.shutdown()
