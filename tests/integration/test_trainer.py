"""The trainer with real processes: torchrun + gloo, real FFCV digits files, real DeepSpeed, TensorBoard's reader."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainrun import DEMO, REPO, base_overrides, eval_record, free_port, run_train, train_losses

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, digits_cache) -> Path:
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = run_train(2, base_overrides(run_dir, digits_cache, steps=24) + ["logging.histograms_every=8"])
    assert "final val top-1" in result.stdout and str(run_dir) in result.stdout
    assert "tensorboard --logdir" in result.stdout
    return run_dir


def test_ddp_loss_falls_and_everything_is_written(ddp_run):
    losses = train_losses(ddp_run)
    assert sorted(losses) == list(range(1, 25))
    first, last = sum(losses[s] for s in range(1, 5)) / 4, sum(losses[s] for s in range(21, 25)) / 4
    assert last < first * 0.8, (first, last)
    assert (ddp_run / "config.yaml").is_file()
    steps = sorted(p.name for p in (ddp_run / "checkpoints").iterdir())
    assert steps == ["step-24"]
    assert eval_record(ddp_run)["eval/samples"] == 360  # the whole digits val split, once


def test_tensorboard_events_hold_every_scalar_tag(ddp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rkan_dist.metrics import EVAL_TAGS, TRAIN_TAGS

    accumulator = EventAccumulator(str(ddp_run / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert set(TRAIN_TAGS) <= tags, set(TRAIN_TAGS) - tags
    assert set(EVAL_TAGS) <= tags
    assert "rkan/layer4/branch_ratio" in tags
    ratios = [event.value for event in accumulator.Scalars("rkan/layer4/branch_ratio")]
    assert all(0 < r < 100 for r in ratios)
    assert any("poly_weight" in tag for tag in accumulator.Tags()["histograms"])
    assert "train/input_batch" in accumulator.Tags()["images"]
    assert [e.step for e in accumulator.Scalars("train/loss")] == list(range(1, 25))


@pytest.mark.numerics
def test_two_rank_eval_equals_one_process_eval_of_the_same_weights(ddp_run, tmp_path, digits_cache):
    export = tmp_path / "model.pt"
    subprocess.run([sys.executable, "-m", "rkan_dist.cli", "export", str(ddp_run / "checkpoints" / "step-24"),
                    "--out", str(export)], check=True, cwd=REPO, capture_output=True, timeout=120)
    result = subprocess.run([sys.executable, "-m", "rkan_dist.cli", "eval", str(export), "--config", str(DEMO),
                             f"data.cache_dir={digits_cache}", "data.num_workers=1"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    fields = dict(item.split("=") for item in result.stdout.split())
    two_rank = eval_record(ddp_run)
    assert int(fields["samples"]) == 360
    assert float(fields["top1"]) == two_rank["eval/top1"]  # exactly: the same samples, the same weights
    assert float(fields["top5"]) == two_rank["eval/top5"]


def test_export_loads_strictly_into_create_model(ddp_run, tmp_path):
    from rkan_dist.models import create_model
    from rkan_dist.weights import load_model_state

    model = create_model("rkan_resnet18", num_classes=10, small_input=True)
    model.load_state_dict(load_model_state(ddp_run / "checkpoints" / "step-24"), strict=True)


@pytest.mark.numerics
def test_deepspeed_zero0_follows_ddp_in_fp32(ddp_run, tmp_path, digits_cache):
    run_dir = tmp_path / "ds"
    run_train(2, base_overrides(run_dir, digits_cache, steps=24) + ["parallel.backend=deepspeed", "parallel.zero_stage=0"])
    ddp, deepspeed = train_losses(ddp_run), train_losses(run_dir)
    assert sorted(deepspeed) == sorted(ddp)
    for step in ddp:
        assert deepspeed[step] == pytest.approx(ddp[step], rel=2e-3, abs=2e-3), step


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_bf16_runs_and_learns(backend, tmp_path, digits_cache):
    run_dir = tmp_path / backend
    extra = ["train.precision=bf16", f"parallel.backend={backend}"] + (["parallel.zero_stage=1"] if backend == "deepspeed" else [])
    run_train(2, base_overrides(run_dir, digits_cache, steps=16) + extra)
    losses = train_losses(run_dir)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert sum(losses[s] for s in range(13, 17)) < sum(losses[s] for s in range(1, 5))


def test_two_nodes_by_c10d_rendezvous_train_as_one_job(tmp_path, digits_cache):
    run_dir = tmp_path / "nodes"
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    processes = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                          "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                          "--rdzv-id", "rkan-test", "-m", "rkan_dist.cli", "train", "--config", str(DEMO),
                          *base_overrides(run_dir, digits_cache, steps=6)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=420)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "world size 2" in outputs[0]  # rank 0 (node 0) logs the joined world
    assert sorted(train_losses(run_dir)) == list(range(1, 7))


@pytest.mark.parametrize("mode", ["skip", "stop"])
def test_injected_nan_is_skipped_or_stops(mode, tmp_path, digits_cache):
    """One process, in-process Trainer; the loss function turns NaN at step 3."""
    from rkan_dist.config import load_config
    from rkan_dist.faults import NonFiniteLossError
    from rkan_dist.trainer import Trainer

    config = load_config(DEMO, base_overrides(tmp_path / "run", digits_cache, steps=6) +
                         [f"train.nonfinite={mode}", "checkpoint.every_steps=2"])
    with Trainer(config) as trainer:
        real = trainer.criterion
        poisoned_once = []

        def poisoned(logits, targets):
            loss = real(logits, targets)
            if trainer.state.global_step == 3 and not poisoned_once:
                poisoned_once.append(True)
                return loss * float("nan")
            return loss

        trainer.criterion = poisoned
        if mode == "skip":
            result = trainer.train()
            assert result.status == "finished" and trainer.state.skipped_steps == 1
            assert all(v == v for v in train_losses(tmp_path / "run").values())  # no NaN logged
        else:
            with pytest.raises(NonFiniteLossError, match="non-finite loss at step 3"):
                trainer.train()
            kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
            assert kept == ["step-2"]


def test_a_non_finite_micro_batch_is_backpropagated_but_never_applied(tmp_path, digits_cache):
    """The flags are read after backward (off the path between forward and backward): the NaN
    micro-batch's gradients exist then, and the skip must drop them, not step with them."""
    from rkan_dist.config import load_config
    from rkan_dist.trainer import Trainer

    config = load_config(DEMO, base_overrides(tmp_path / "run", digits_cache, steps=4) +
                         ["train.nonfinite=skip", "checkpoint.every_steps=0"])
    with Trainer(config) as trainer:
        assert torch.backends.cudnn.benchmark, "static-shape training autotunes its convolutions"
        module, real = trainer.engine.module, trainer.criterion
        seen: dict[str, object] = {}

        def poisoned(logits, targets):
            if trainer.state.global_step == 2 and "weights" not in seen:
                seen["weights"] = {name: p.detach().clone() for name, p in module.named_parameters()}
                return real(logits, targets) * float("nan")
            if "weights" in seen and "unchanged" not in seen:  # the forward after the skipped micro-batch
                seen["unchanged"] = all(torch.equal(p, seen["weights"][name]) for name, p in module.named_parameters())
                seen["gradients_left"] = [name for name, p in module.named_parameters() if p.grad is not None]
            return real(logits, targets)

        backward, backward_calls = trainer.engine.backward, []
        trainer.engine.backward = lambda loss: (backward_calls.append(bool(torch.isfinite(loss))), backward(loss))
        trainer.criterion = poisoned
        result = trainer.train()
    assert (result.status, result.global_step, trainer.state.skipped_steps) == ("finished", 4, 1)
    # the check waits for backward: every micro-batch, the NaN one too, was backpropagated first
    assert backward_calls == [True, True, False, True, True], backward_calls
    assert seen["unchanged"] is True, "the NaN micro-batch's gradients reached the weights"
    assert seen["gradients_left"] == [], "the dropped window's gradients must be cleared"
    assert all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_closing_the_trainer_leaves_no_collective_or_reader_threads(backend, tmp_path, digits_cache):
    """DDP and DeepSpeed hold the gloo group past destroy_process_group unless the Trainer lets
    go of them first; torn down during interpreter finalization instead, they now and then abort
    a finished task (seen on Slurm)."""
    import json

    script = Path(__file__).parent / "scripts" / "trainer_teardown.py"
    overrides = base_overrides(tmp_path / "run", digits_cache, steps=3)  # 3 of 45 steps: mid-epoch
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(tmp_path), backend, str(DEMO), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    for rank in (0, 1):
        record = json.loads((tmp_path / f"{backend}-rank{rank}.json").read_text())
        assert (record["status"], record["step"]) == ("finished", 3)
        assert record["gloo_threads_while_training"], "the check must see gloo's threads to see them go"
        assert record["python_threads_after_close"] == []
        if backend == "ddp":
            assert record["gloo_threads_after_close"] == []
        else:
            # DeepSpeed's own references go; one group's threads stay held inside torch (no Python
            # referrer left).
            assert record["deepspeed_world_group_released"]
            assert len(record["gloo_threads_after_close"]) < len(record["gloo_threads_while_training"])


def test_a_non_finite_stop_from_the_cli_is_one_line_an_error_event_and_exit_2(tmp_path, digits_cache):
    """train.nonfinite=stop through `rkan-dist train`: a restart would meet the same loss at the same
    step, so it is an error (exit 2, which `--nproc N` does not restart), written to the ledger."""
    import json
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    args = [*base_overrides(run_dir, digits_cache, steps=30), "train.nonfinite=stop", "optim.lr=1e30",
            "optim.scale_lr=false", "checkpoint.every_steps=0"]
    result = subprocess.run([sys.executable, "-m", "rkan_dist.cli", "train", "--config", str(DEMO), *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("rkan-dist: error: non-finite loss at step")]
    assert len(lines) == 1, result.stderr[-3000:]
    events = json.loads((run_dir / "events.json").read_text())["events"]
    (error,) = [event for event in events if event["event"] == "error"]
    assert error["kind"] == "nonfinite" and error["message"] == lines[0].removeprefix("rkan-dist: error: ")
