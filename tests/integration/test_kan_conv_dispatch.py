"""`auto` on CUDA: rank 0 times the KAN conv implementations and every rank runs its choice
(two real gloo processes; the timing branch runs here on CPU tensors)."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.integration


def _rank(rank: int, store: str, results: str) -> None:
    from rkan_dist.models import kan_conv
    from rkan_dist.models.kan_conv import KANConv2d

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        timed = []

        def time_implementations(*args, **kwargs):
            timed.append(rank)
            # rank 0 finds depthwise faster; rank 1 would have picked grouped had it timed anything
            return {"grouped": 2.0, "depthwise": 1.0} if rank == 0 else {"grouped": 1.0, "depthwise": 2.0}

        kan_conv.CUDA_CANDIDATES = ("grouped", "depthwise")
        kan_conv.time_implementations = time_implementations
        conv = KANConv2d(4, degree=2)
        weight, bias = (t.detach() for t in conv.grouped_conv_parameters())
        choice = kan_conv._timed_choice(torch.randn(2, 4, 5, 5), weight, bias, 1, conv.coefficients, "tanh")
        with open(f"{results}.{rank}", "w") as f:
            json.dump({"choice": choice, "timed": timed}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_rank_0_decides_and_every_rank_runs_its_choice(tmp_path):
    results = tmp_path / "choice"
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(results)), nprocs=2)
    reports = [json.loads((tmp_path / f"choice.{rank}").read_text()) for rank in (0, 1)]
    assert reports == [{"choice": "depthwise", "timed": [0]}, {"choice": "depthwise", "timed": []}]
