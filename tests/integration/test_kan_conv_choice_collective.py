"""`auto` calls a collective only where every rank reaches it: two real gloo processes, a DDP
training step, an eval over uneven val shards and forwards on rank 0 alone.

The test hook kan_conv.CPU_TIMED_CANDIDATES makes `auto` time grouped against depthwise on CPU
tensors, so the path CUDA runs (time on rank 0, broadcast the choice) runs here. Each rank makes a
different candidate slow (rank 0 grouped, rank 1 depthwise): a rank that timed for itself would
pick differently from rank 0, and the eval's choice, depthwise, differs from the fixed default
that a choice made without a training decision falls back to (grouped).

What the code before shared_choices() did with the same script (the batch size was part of the
key and any new key on a rank with peers was timed on rank 0 and broadcast, wherever it came
from): rank 0's forward before training broadcasts while rank 1 waits in a barrier; in training,
rank 0's second, smaller batch is a new key for rank 0 alone, which broadcasts while rank 1 is in
DDP's gradient all-reduce; in eval, rank 0's extra last batch of one image broadcasts while rank 1
sums the eval counts; after training, rank 0's forward at a new size broadcasts alone. Each is a
collective that the other rank never joins: a hang (gloo's 60 s timeout here, then an error) or
mismatched collectives. Checked by hand on that code with this script (and the hook added): the
forward before training hung until gloo's timeout, and with that forward left out, the second
training step did.
"""

import json
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.integration

SLOW_S = 0.05  # far above a candidate's time at these sizes, so the slow one never wins a timing
TRAIN_SIZE, OTHER_SIZE = 12, 16
TRAIN_BATCHES = {0: (4, 3), 1: (4, 4)}  # the last training batch differs in size between the ranks
VAL_BATCHES = {0: (4, 4, 1), 1: (4, 4)}  # rank 0 has one more, smaller, val batch
HANG_LIMIT_S = 200  # both processes together; a hang fails the test at this point instead of blocking CI


def _rank(rank: int, store: str, results: str) -> None:
    from rkan_dist.models import kan_conv
    from rkan_dist.models.kan_conv import KANConv2d

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        kan_conv.CPU_TIMED_CANDIDATES = ("grouped", "depthwise")
        slow_name = "grouped" if rank == 0 else "depthwise"
        slow = kan_conv.IMPLEMENTATIONS[slow_name]
        kan_conv.IMPLEMENTATIONS[slow_name] = kan_conv.Implementation(
            lambda *args: time.sleep(SLOW_S) or slow.forward(*args), slow.backward)

        phases: dict[str, dict] = {}  # per phase: implementations run, shapes timed, broadcasts called

        def enter(name: str) -> None:
            phases[name] = {"choices": [], "timed": [], "broadcasts": 0}

        def current() -> dict:
            return phases[next(reversed(phases))]

        choose, time_them, broadcast = (kan_conv.choose_implementation, kan_conv.time_implementations,
                                        dist.broadcast_object_list)

        def recorded_choice(*args):
            current()["choices"].append(choose(*args))
            return current()["choices"][-1]

        def recorded_timing(x, *args):
            current()["timed"].append(list(x.shape))
            return time_them(x, *args)

        def recorded_broadcast(*args, **kwargs):
            current()["broadcasts"] += 1
            return broadcast(*args, **kwargs)

        kan_conv.choose_implementation, kan_conv.time_implementations = recorded_choice, recorded_timing
        dist.broadcast_object_list = recorded_broadcast  # what rkan_dist.distributed.broadcast_object calls

        torch.manual_seed(0)
        model = nn.Sequential(KANConv2d(4, degree=2, stride=2), KANConv2d(4, degree=2), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(4, 3))

        enter("rank 0 alone, before training")  # e.g. an export check on a shape training never sees
        if rank == 0:
            with torch.no_grad():
                model.eval()(torch.randn(1, 4, OTHER_SIZE, OTHER_SIZE))
        dist.barrier()

        enter("training")
        ddp = nn.parallel.DistributedDataParallel(model.train())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for batch in TRAIN_BATCHES[rank]:
            with kan_conv.shared_choices():
                logits = ddp(torch.randn(batch, 4, TRAIN_SIZE, TRAIN_SIZE))
            F.cross_entropy(logits, torch.randint(3, (batch,))).backward()
            optimizer.step()
            optimizer.zero_grad()

        enter("eval")  # around DDP, as the engines evaluate
        model.eval()
        correct = torch.zeros(1)
        with torch.no_grad():
            for batch in VAL_BATCHES[rank]:
                correct += (model(torch.randn(batch, 4, TRAIN_SIZE, TRAIN_SIZE)).argmax(1) == 0).sum()
        dist.all_reduce(correct)

        enter("rank 0 alone, after training")  # e.g. an image grid at another resolution
        if rank == 0:
            with torch.no_grad():
                model(torch.randn(1, 4, OTHER_SIZE, OTHER_SIZE))
        dist.barrier()
        with open(f"{results}.{rank}", "w") as f:
            json.dump({name: {**seen, "choices": sorted(set(seen["choices"]))} for name, seen in phases.items()}, f)
    finally:
        dist.destroy_process_group()


def _run_two_ranks(tmp_path) -> list[dict]:
    context = mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path / "phases")), nprocs=2, join=False)
    deadline = time.monotonic() + HANG_LIMIT_S
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the two ranks did not finish within {HANG_LIMIT_S} s: a collective that not every rank "
                        "called")
    return [json.loads((tmp_path / f"phases.{rank}").read_text()) for rank in (0, 1)]


@pytest.mark.timeout(HANG_LIMIT_S + 60)
def test_choices_are_shared_in_training_and_made_without_collectives_elsewhere(tmp_path):
    rank0, rank1 = _run_two_ranks(tmp_path)
    nothing = {"timed": [], "broadcasts": 0}

    # no training decision yet, and peers: the documented default, nothing timed or broadcast
    assert rank0["rank 0 alone, before training"] == {"choices": ["grouped"], **nothing}
    assert rank1["rank 0 alone, before training"] == {"choices": [], **nothing}

    # (a) rank 0 timed each layer's shape once (the smaller batch is the same key) and both ranks
    # run its choice, which rank 1's own timing would not have picked
    assert rank0["training"] == {"choices": ["depthwise"], "timed": [[4, 4, 12, 12], [4, 4, 6, 6]], "broadcasts": 2}
    assert rank1["training"] == {"choices": ["depthwise"], "timed": [], "broadcasts": 2}

    # (b) uneven val shards: no collective, the training decision on both ranks
    assert rank0["eval"] == rank1["eval"] == {"choices": ["depthwise"], **nothing}

    # (c) rank 0 alone at a size training never saw: the nearest training decision of each layer
    assert rank0["rank 0 alone, after training"] == {"choices": ["depthwise"], **nothing}
    assert rank1["rank 0 alone, after training"] == {"choices": [], **nothing}
