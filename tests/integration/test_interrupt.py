"""Ctrl-C and SIGTERM outside Slurm stop cleanly; a resume on another world size is the same run.

One run of `rkan-dist train --nproc 2` (real torchrun, 2 gloo processes) gets SIGINT on its
process group after its first step, as a terminal's Ctrl-C sends it. Copies of its folder are then
continued by the same command, by 1 process and by 3 processes (these two with every trained
sample id recorded by scripts/sample_trace.py). The Python API and the second Ctrl-C have their
own short runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml
from trainrun import (
    DEMO,
    REPO,
    base_overrides,
    checkpoint_steps,
    last_step,
    records,
    run_train,
    start_train,
    train_command,
    wait_until,
)
from trainrun import test_env as run_env  # not collected as a test

from rkan_dist.checkpoint import validate
from rkan_dist.data.sampling import epoch_permutation, epoch_samples
from rkan_dist.supervisor import _catches

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).parent / "scripts"
BATCH = 48  # per process: a global batch of 96, which 1, 2 and 3 processes can all keep
GLOBAL_BATCH = 2 * BATCH
TRAIN_SAMPLES = 1437
EPOCH_STEPS = TRAIN_SAMPLES // GLOBAL_BATCH  # 14: the runs train exactly the interrupted epoch
LINE = "interrupted at step {step}; checkpoint {path}; re-run the same command to continue"


def overrides(run_dir: Path, cache: Path) -> list[str]:
    return base_overrides(run_dir, cache, steps=EPOCH_STEPS, batch_size=BATCH) + [
        # 8 px keeps an epoch short; the demo's schedule, with the lr scaled to the global batch
        "data.min_res=8", "data.max_res=8", "data.val_res=8", "schedule.name=onecycle", "optim.lr=0.8",
        "optim.scale_lr=true", "logging.image_grid=false", "logging.histograms_every=0"]


def train_records(run_dir: Path) -> list[dict]:
    return [record for record in records(run_dir) if record["kind"] == "train"]


def tensorboard_steps(run_dir: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [event.step for event in accumulator.Scalars(tag)]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, digits_cache) -> dict:
    """The 2-process run stopped by SIGINT to its process group after its first step (a pristine copy)."""
    base = tmp_path_factory.mktemp("interrupt")
    run_dir = base / "run"
    process = start_train(2, overrides(run_dir, digits_cache), base / "interrupted.log")
    try:
        wait_until(lambda: last_step(run_dir) >= 1, timeout=400, process=process)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the foreground process group
        returncode = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    output = (base / "interrupted.log").read_text()
    pristine = base / "pristine"
    shutil.copytree(run_dir, pristine)
    return {"run_dir": pristine, "original": run_dir, "returncode": returncode, "output": output,
            "cache": digits_cache}


def copy_of(interrupted: dict, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted["run_dir"], run_dir)
    return run_dir


def stopped_step(interrupted: dict) -> int:
    return checkpoint_steps(interrupted["run_dir"])[-1]


def test_ctrl_c_stops_every_rank_with_one_checkpoint_one_line_and_exit_130(interrupted):
    run_dir, output = interrupted["run_dir"], interrupted["output"]
    assert interrupted["returncode"] == 130, output[-3000:]
    assert "Traceback" not in output and "SignalException" not in output, output[-3000:]
    steps = checkpoint_steps(run_dir)
    assert len(steps) == 1 and 1 <= steps[0] < EPOCH_STEPS, steps  # periodic checkpoints are off
    step = steps[0]
    checkpoint = run_dir / "checkpoints" / f"step-{step}"
    validate(checkpoint)
    assert output.count("interrupted at step") == 1
    assert LINE.format(step=step, path=interrupted["original"] / "checkpoints" / f"step-{step}") in output
    for rank in (0, 1):  # both ranks stopped at the same step boundary
        assert any(line.startswith(f"[rank{rank}]") and f"saving a checkpoint at step {step}" in line
                   for line in output.splitlines()), output[-3000:]
    events = json.loads((run_dir / "events.json").read_text())["events"]
    stops = [event for event in events if event["event"] == "stop"]
    assert [(event["kind"], event["step"], event["signal"]) for event in stops] == [("interrupt", step, "SIGINT")]
    assert [record["step"] for record in train_records(run_dir)] == list(range(1, step + 1))


@pytest.fixture(scope="module")
def continued(interrupted, tmp_path_factory) -> Path:
    """The same command again, on a copy of the interrupted run's folder."""
    run_dir = copy_of(interrupted, tmp_path_factory.mktemp("continued"))
    result = run_train(2, overrides(run_dir, interrupted["cache"]))
    assert f"resumed from {run_dir / 'checkpoints'}/step-{stopped_step(interrupted)}: step " \
           f"{stopped_step(interrupted)}," in result.stderr
    return run_dir


def test_the_same_command_continues_at_that_step_without_repeating_a_step(continued):
    steps = list(range(1, EPOCH_STEPS + 1))
    assert [record["step"] for record in train_records(continued)] == steps  # metrics.jsonl: each step once
    assert tensorboard_steps(continued) == steps  # and TensorBoard


def trace_command(nproc: int, trace_dir: Path, run_dir: Path, cache: Path) -> list[str]:
    script = [str(SCRIPTS / "sample_trace.py"), str(trace_dir), "train", "--config", str(DEMO),
              *overrides(run_dir, cache)]
    if nproc == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]


@pytest.mark.parametrize("nproc, batch_size, grad_accum", [(1, 48, 2), (3, 32, 1)])
def test_a_resume_on_another_world_size_keeps_the_batch_the_lr_and_every_sample_once(
        nproc, batch_size, grad_accum, interrupted, continued, tmp_path):
    run_dir, trace_dir = copy_of(interrupted, tmp_path), tmp_path / "trace"
    result = subprocess.run(trace_command(nproc, trace_dir, run_dir, interrupted["cache"]), capture_output=True,
                            text=True, timeout=480, cwd=REPO, env=run_env())
    assert result.returncode == 0, result.stderr[-4000:]
    step = stopped_step(interrupted)
    position = step * GLOBAL_BATCH
    line = next(line for line in result.stderr.splitlines() if "resumed from" in line)
    assert f"step {step}, epoch 0, sample {position} of {epoch_samples(TRAIN_SAMPLES, GLOBAL_BATCH)}" in line
    assert f"world size 2 -> {nproc}" in line and f"global batch {GLOBAL_BATCH}" in line
    assert f"global batch {GLOBAL_BATCH}, peak lr" in result.stderr  # the run's opening line
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (resolved["data"]["batch_size"], resolved["train"]["grad_accum"]) == (batch_size, grad_accum)

    # Every sample of the interrupted epoch exactly once: the 2-process run read the permutation's
    # first `position` samples (micro-batches of all ranks read it front to back), this run the rest.
    traced = [json.loads(line) for rank in range(nproc) for line in (trace_dir / f"rank{rank}.jsonl").open()]
    assert {record["epoch"] for record in traced} == {0} and {record["world_size"] for record in traced} == {nproc}
    assert all(len(record["ids"]) == batch_size for record in traced)
    assert sorted({record["position"] for record in traced}) == list(
        range(position, epoch_samples(TRAIN_SAMPLES, GLOBAL_BATCH), batch_size * nproc))
    read_now = [sample for record in traced for sample in record["ids"]]
    order = epoch_permutation(0, 0, TRAIN_SAMPLES)  # train.seed=0
    read_before = order[:position].tolist()
    epoch = read_before + read_now
    assert len(epoch) == len(set(epoch)) == epoch_samples(TRAIN_SAMPLES, GLOBAL_BATCH)
    assert set(epoch) == set(order[:len(epoch)].tolist())
    per_step = Counter(record["step"] for record in traced)  # micro-batches of all ranks in each step
    assert set(per_step) == set(range(step, EPOCH_STEPS)) and set(per_step.values()) == {grad_accum * nproc}

    # The same steps as the 2-process continuation, each once, at the same lr.
    now, reference = train_records(run_dir), train_records(continued)
    assert [record["step"] for record in now] == list(range(1, EPOCH_STEPS + 1))
    assert [record["train/lr"] for record in now] == [record["train/lr"] for record in reference]


def test_the_python_api_raises_interrupted_with_the_step_and_checkpoint(tmp_path, digits_cache):
    run_dir = tmp_path / "run"
    log = (tmp_path / "api.err").open("w")
    process = subprocess.Popen([sys.executable, str(SCRIPTS / "api_interrupt.py"), str(DEMO),
                                *overrides(run_dir, digits_cache)], cwd=REPO, env=run_env(), text=True,
                               stdout=subprocess.PIPE, stderr=log)
    try:
        wait_until(lambda: last_step(run_dir) >= 1, timeout=300, process=process)
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    stderr = (tmp_path / "api.err").read_text()
    assert process.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    event = json.loads(out.splitlines()[0])
    step = checkpoint_steps(run_dir)[-1]
    checkpoint = run_dir / "checkpoints" / f"step-{step}"
    assert event["event"] == "interrupted" and event["step"] == step and event["checkpoint"] == str(checkpoint)
    assert event["message"] == LINE.format(step=step, path=checkpoint)
    assert event["keyboard_interrupt"] and event["signal"] == "SIGINT"
    assert event["handler_restored"]  # train() put back the SIGINT handler it found
    validate(checkpoint)


def wait_for_handlers(pid: int, timeout: float = 120) -> None:
    """Until process `pid` has its stop handlers (StopSignals catches SIGTERM; Python alone does not)."""
    deadline = time.monotonic() + timeout
    while not _catches(pid, signal.SIGTERM):
        assert time.monotonic() < deadline, "the process never installed its stop handlers"
        time.sleep(0.02)


def test_a_second_ctrl_c_aborts_at_once(tmp_path, digits_cache):
    """One process, while the Trainer is being built: the first SIGINT asks for a stop, the second aborts."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "abort.log"
    process = subprocess.Popen(train_command(1, overrides(run_dir, digits_cache)), cwd=REPO, env=run_env(),
                               stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for_handlers(process.pid)
        process.send_signal(signal.SIGINT)
        wait_until(lambda: "stopping at the next step boundary" in log_path.read_text(), timeout=60, process=process)
        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    output = log_path.read_text()
    assert returncode == 130 and "Traceback" not in output, output[-3000:]
    assert "rkan-dist: aborted by a second SIGINT" in output
    assert checkpoint_steps(run_dir) == []


def test_a_second_ctrl_c_to_a_torchrun_run_kills_every_process_at_once(tmp_path, digits_cache):
    run_dir = tmp_path / "run"
    log_path = tmp_path / "abort.log"
    process = start_train(2, overrides(run_dir, digits_cache), log_path)
    try:
        wait_until(lambda: len(psutil.Process(process.pid).children(recursive=True)) >= 3, timeout=120,
                   process=process)  # torchrun's agent and its 2 workers
        tree = psutil.Process(process.pid).children(recursive=True)
        os.killpg(process.pid, signal.SIGINT)
        wait_until(lambda: "every process stops at the next step boundary" in log_path.read_text(), timeout=60,
                   process=process)
        os.killpg(process.pid, signal.SIGINT)
        returncode = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    output = log_path.read_text()
    assert returncode == 130 and "Traceback" not in output, output[-3000:]
    assert "aborted by a second interrupt" in output
    gone, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == []


def test_ctrl_c_during_start_up_reaches_the_workers_once_they_listen_and_stops_before_a_step(tmp_path, digits_cache):
    """The workers are still importing when the signal comes: the parent holds it until each has its
    handler, and the Trainer, once built, stops before its first step."""
    run_dir = tmp_path / "run"
    log_path = tmp_path / "start-up.log"
    process = start_train(2, overrides(run_dir, digits_cache), log_path)
    try:
        wait_until(lambda: len(psutil.Process(process.pid).children(recursive=True)) >= 3, timeout=120,
                   process=process)
        os.killpg(process.pid, signal.SIGINT)
        returncode = process.wait(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    output = log_path.read_text()
    assert returncode == 130 and "Traceback" not in output, output[-3000:]
    assert LINE.format(step=0, path="none (no step was finished)") in output
    assert checkpoint_steps(run_dir) == [] and train_records(run_dir) == []
    events = json.loads((run_dir / "events.json").read_text())["events"]
    assert [(event["event"], event.get("kind"), event.get("step")) for event in events
            if event["event"] == "stop"] == [("stop", "interrupt", 0)]
