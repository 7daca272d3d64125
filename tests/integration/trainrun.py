"""Launch real training runs (torchrun + gloo on the digits data) and read what they wrote."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def base_overrides(run_dir: Path, cache: Path, steps: int, batch_size: int = 16) -> list[str]:
    """Small, fast and fully logged: every step's loss lands in metrics.jsonl."""
    return [f"train.run_dir={run_dir}", f"data.cache_dir={cache}", f"train.max_steps={steps}",
            "logging.every_steps=1", "logging.progress_bar=false", "checkpoint.every_steps=0",
            f"data.batch_size={batch_size}", "data.num_workers=1", "train.eval_every=100",
            # a short run with no warmup: a small constant lr keeps the first steps stable
            "schedule.name=constant", "optim.lr=0.025", "optim.scale_lr=false",
            "train.precision=fp32"]  # exact comparisons (resume, DDP vs DeepSpeed) are made in fp32


def train_command(nproc: int, overrides: list[str], config: Path = DEMO) -> list[str]:
    return [sys.executable, "-m", "rkan_dist.cli", "train", "--config", str(config), "--nproc", str(nproc), *overrides]


def test_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_train(nproc: int, overrides: list[str], config: Path = DEMO, timeout: int = 480,
              check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(nproc, overrides, config), capture_output=True, text=True,
                            timeout=timeout, cwd=REPO, env=test_env())
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def start_train(nproc: int, overrides: list[str], log_path: Path, config: Path = DEMO) -> subprocess.Popen:
    """A run in a session of its own, so that the test's kill reaches nothing else."""
    log = open(log_path, "w")  # noqa: SIM115 - the child owns it until it ends
    return subprocess.Popen(train_command(nproc, overrides, config), cwd=REPO, env=test_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process below it, at once, as a node failure would.

    torchrun starts each worker in a session of its own, so killing the launcher's process
    group alone would leave the workers training on as orphans."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        tree = psutil.Process(process.pid)
        victims = [tree, *tree.children(recursive=True)]
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.send_signal(signal.SIGKILL)
        psutil.wait_procs(victims, timeout=60)
    process.wait(timeout=60)


def wait_until(predicate, timeout: float, process: subprocess.Popen | None = None, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before the condition held")
        time.sleep(poll)
    raise AssertionError("timed out waiting for the run")


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # the line being written when the run was killed
            out.append(json.loads(line))
    return out


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in records(run_dir) if r["kind"] == "train"}


def last_step(run_dir: Path) -> int:
    steps = [r["step"] for r in records(run_dir) if r["kind"] == "train"]
    return max(steps, default=0)


def eval_record(run_dir: Path) -> dict:
    return [r for r in records(run_dir) if r["kind"] == "eval"][-1]


def checkpoint_steps(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name.split("-")[1]) for p in root.iterdir() if p.name.startswith("step-"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
