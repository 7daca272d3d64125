"""Two real ranks (torchrun, gloo): disjoint train shards covering the set, val exactly once,
and the digits files built by one process while the other waits."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rkan_dist.data.beton import read_labels
from rkan_dist.data.images import load_rgb

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]
BATCH = 16

RANK_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from rkan_dist.config import DataConfig
    from rkan_dist.data import build_loaders

    cache_dir, out_dir, fmt = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = DataConfig(dataset="digits", format=fmt, cache_dir=cache_dir, batch_size=%(batch)d, val_batch_size=64,
                        num_workers=1, min_res=32, max_res=32, val_res=32, crop_ratio=1.0, hflip=False,
                        mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    train, val = build_loaders(config, seed=4, device=torch.device("cpu"), channels_last=False)
    seen = {"steps_per_epoch": train.steps_per_epoch, "val_num_samples": val.num_samples, "train": {}, "val": []}
    for epoch in (0, 1):
        labels = [label for _, batch in train.batches(epoch) for label in batch.tolist()]
        seen["train"][epoch] = {"ids": train.shard(epoch).tolist(), "labels": labels}
    for images, labels in val:  # fingerprint each val image by its pixels: identity without trusting ids
        pixels = images.mul(255).round().byte().permute(0, 2, 3, 1).contiguous().numpy()
        seen["val"] += [[hashlib.sha1(p.tobytes()).hexdigest(), int(l)] for p, l in zip(pixels, labels.tolist())]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(seen, handle)
    dist.destroy_process_group()
""") % {"batch": BATCH}


def run_two_ranks(tmp_path, fmt: str, cache_dir) -> list[dict]:
    script = tmp_path / "two_ranks.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / f"out-{fmt}"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(cache_dir), str(out), fmt], env=env, capture_output=True, text=True,
                            timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("fmt", ["ffcv", "folder"])
def test_two_ranks_split_train_and_val_exactly(tmp_path, digits_data, fmt):
    # a fresh cache: the two ranks race to build the digits files (rank 0 builds, rank 1 waits)
    ranks = run_two_ranks(tmp_path, fmt, tmp_path / "cache")
    built = tmp_path / "cache" / "digits-32px"
    assert (built / "train.beton").read_bytes() == digits_data.train_beton.read_bytes()  # deterministic build
    assert not [p for p in built.parent.iterdir() if "partial" in p.name]

    labels = read_labels(digits_data.train_beton)
    steps = ranks[0]["steps_per_epoch"]
    assert steps == ranks[1]["steps_per_epoch"] == 1437 // 2 // BATCH
    for epoch in ("0", "1"):
        ids = [rank["train"][epoch]["ids"] for rank in ranks]
        assert all(len(shard) == steps * BATCH for shard in ids)
        assert not set(ids[0]) & set(ids[1])  # disjoint
        # covering: everything but the drop_last remainder (fewer than one global batch)
        assert 1437 - len(set(ids[0]) | set(ids[1])) < 2 * BATCH + 2
        for rank in ranks:  # what each rank yielded is its shard, in order
            assert rank["train"][epoch]["labels"] == labels[rank["train"][epoch]["ids"]].tolist()
    assert ranks[0]["train"]["0"]["ids"] != ranks[0]["train"]["1"]["ids"]  # reshuffled per epoch

    from torchvision.datasets import ImageFolder

    expected = sorted([hashlib.sha1(load_rgb(path).tobytes()).hexdigest(), label]
                      for path, label in ImageFolder(str(digits_data.val_dir)).samples)
    seen = sorted(ranks[0]["val"] + ranks[1]["val"])
    assert ranks[0]["val_num_samples"] == 360 and len(seen) == 360
    assert seen == expected  # every val image exactly once, with its own label
    assert abs(len(ranks[0]["val"]) - len(ranks[1]["val"])) <= 1
    assert np.unique([fingerprint for fingerprint, _ in seen]).size == 360
