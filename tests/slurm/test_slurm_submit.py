"""`rkan-dist submit` on the real dev cluster (2 logical nodes x 1 task, gloo, CPU, digits):
a plain run, preemption by USR2 (scancel, submitit's `_interrupt` with and without SIGTERM),
a real time limit, a hard `scontrol requeue`, and submissions refused before queuing.

Every interrupted run must end with weights bitwise equal to one uninterrupted run of the same
config (the module's `reference`, which runs alongside the first interrupted job to save time).
Waits poll files and `scontrol show job`, each with its own timeout (no sacct on this cluster).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench.faults import task_pid
from rkan_dist import submit
from rkan_dist.ledger import LEDGER_NAME
from rkan_dist.weights import load_model_state

pytestmark = pytest.mark.timeout(420)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = REPO_ROOT / "configs" / "demo.yaml"
STEPS = 20
EVERY = 4  # periodic checkpoints at 4, 8, ...: an epoch is 44 steps, so every stop is mid-epoch
RESOURCES = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1"]
JOB_TIMEOUT_S = 300


def overrides(run_dir: Path, cache: Path, steps: int = STEPS, every: int = EVERY) -> list[str]:
    return [f"train.run_dir={run_dir}", f"data.cache_dir={cache}", f"train.max_steps={steps}",
            f"checkpoint.every_steps={every}", "checkpoint.keep=20", "data.batch_size=16", "data.num_workers=1",
            "logging.progress_bar=false", "logging.every_steps=1", "train.eval_every=100",
            "train.precision=fp32"]  # pinned: the demo's own precision may change under us


def submit_job(run_dir: Path, cache: Path, *flags: str, steps: int = STEPS, every: int = EVERY):
    """Submit in-process (the same code as the CLI) and return submitit's Job."""
    args = submit.build_parser().parse_args(["--config", str(DEMO), *RESOURCES, *flags,
                                             *overrides(run_dir, cache, steps, every)])
    (job,) = submit.submit(submit.prepare(args))
    return job


def wait_until(condition: Callable[[], object], timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def logged_steps(run_dir: Path) -> dict[int, float]:
    """{step: train loss} from metrics.jsonl (a resumed run truncates what the killed one wrote after)."""
    path = run_dir / "metrics.jsonl"
    losses = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record.get("kind") == "train" and "train/loss" in record:
                    losses[record["step"]] = record["train/loss"]
    return losses


def ledger_events(run_dir: Path, event: str | None = None) -> list[dict]:
    path = run_dir / LEDGER_NAME
    events = json.loads(path.read_text())["events"] if path.is_file() else []
    return [item for item in events if event is None or item["event"] == event]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model_state(run_dir / "checkpoints" / f"step-{STEPS}")


def assert_bitwise_equal(run_dir: Path, reference: Path) -> None:
    final, expected = final_weights(run_dir), final_weights(reference)
    assert final.keys() == expected.keys()
    different = [name for name in final if not torch.equal(final[name], expected[name])]
    assert different == [], f"{len(different)} of {len(final)} tensors differ from the reference, e.g. {different[:3]}"
    losses, expected_losses = logged_steps(run_dir), logged_steps(reference)
    # Every step is logged exactly once across the stop and the resume, with the same loss.
    assert set(losses) == set(expected_losses)
    assert all(losses[step] == expected_losses[step] for step in losses), "train losses differ"


def job_processes(run_dir: Path) -> list[str]:
    """Command lines of live processes that belong to this run (none may outlive the job)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if str(run_dir) in cmdline:
                    found.append(f"{proc.name}: {cmdline}")
    return found


def assert_clean_end(slurm, job_id: int, run_dir: Path, restarts: int) -> dict[str, str]:
    record = slurm.wait_for(job_id, "COMPLETED", timeout=JOB_TIMEOUT_S, min_restarts=restarts)
    # A wrong restart count is a question of which run stopped why: the ledger and the logs say.
    assert record["Restarts"] == str(restarts) and record["JobId"] == str(job_id), (
        f"restarts {record['Restarts']} (expected {restarts}); ledger events:\n"
        + "\n".join(json.dumps(event) for event in ledger_events(run_dir)) + "\n" + slurm.job_output(record))
    assert record["ExitCode"] == "0:0"
    wait_until(lambda: not job_processes(run_dir), timeout=15, what="the job's processes to exit")
    return record


def interrupt_when_training(slurm, job_id: int, run_dir: Path, after_step: int, send: Callable[[], None]) -> float:
    """Wait until training passed `after_step` in the current run, then signal; returns when it was sent."""
    wait_until(lambda: max(logged_steps(run_dir), default=-1) >= after_step, timeout=JOB_TIMEOUT_S,
               what=f"job {job_id} to pass step {after_step}")
    sent = time.time()
    send()
    return sent


def check_usr2_cycle(run_dir: Path, cycle: int, sent: float, steps_before: int, kind: str) -> float:
    """The cycle-th stop came from the signal and the next run resumed from exactly its checkpoint;
    returns the signal -> training-again time."""
    stop = ledger_events(run_dir, "stop")[cycle]
    start = ledger_events(run_dir, "start")[cycle + 1]
    assert stop["kind"] == kind and stop["requeue"] is True
    assert stop["step"] >= steps_before  # stopped at the next boundary, not from an older checkpoint
    assert start["restart_count"] == cycle + 1 and start["step"] == stop["step"]
    return start["time"] - sent


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits-cache")


@pytest.fixture(scope="module")
def cleanup(slurm_cluster):
    """Cancel this module's jobs at its end (the per-test `slurm` fixture would cancel the reference)."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


@pytest.fixture(scope="module")
def reference(cleanup, tmp_path_factory, digits_cache) -> dict:
    """One uninterrupted run, submitted through the CLI entry; waited for on first `.wait()`."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = submit.main(["--config", str(DEMO), *RESOURCES, *overrides(run_dir, digits_cache)])
    assert code == 0, output.getvalue()
    job_id = int(output.getvalue().split("submitted job ")[1].split()[0])

    finished: list[Path] = []

    def wait() -> Path:  # once: scontrol forgets finished jobs after MinJobAge (300 s)
        if not finished:
            assert_clean_end(cleanup, job_id, run_dir, restarts=0)
            finished.append(run_dir)
        return run_dir

    return {"run_dir": run_dir, "job_id": job_id, "stdout": output.getvalue(), "wait": wait}


def test_preemption_by_scancel_usr2_resumes_exactly(cleanup, reference, tmp_path, digits_cache) -> None:
    slurm, run_dir = cleanup, tmp_path / "run"
    job = submit_job(run_dir, digits_cache)
    job_id = int(job.job_id)
    sent = interrupt_when_training(slurm, job_id, run_dir, EVERY + 2,
                                   lambda: slurm.run("scancel", "--signal=USR2", str(job_id)))
    steps_before = max(logged_steps(run_dir))
    record = slurm.wait_for(job_id, ["PENDING", "REQUEUED", "RUNNING"], timeout=60, min_restarts=1)
    assert record["JobId"] == str(job_id)
    assert_clean_end(slurm, job_id, run_dir, restarts=1)
    resume_s = check_usr2_cycle(run_dir, 0, sent, steps_before, "preemption")
    print(f"USR2 -> training again after requeue: {resume_s:.1f} s")
    ledger = json.loads((run_dir / LEDGER_NAME).read_text())
    assert (ledger["preemptions"], ledger["timeouts"]) == (1, 0)
    screen = subprocess.run([sys.executable, "-m", "rkan_dist.cli", "status", str(run_dir)], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    assert f"job:        {job_id} COMPLETED (Slurm)" in screen and "restarts:   preemption 1\n" in screen, screen
    assert f"checkpoint: step-{STEPS} (written " in screen and "failures:   none" in screen, screen
    # Rank 0 and rank 1 both stopped and exited on their own; nobody was killed mid-save.
    first_run_log = (run_dir / "slurm" / str(job_id) / f"{job_id}_1_log.err").read_text()
    assert "Traceback" not in first_run_log
    assert_bitwise_equal(run_dir, reference["wait"]())


def test_submit_runs_to_completion_with_logs_checkpoints_and_tensorboard(reference) -> None:
    run_dir = reference["wait"]()
    job_id = reference["job_id"]
    stdout = reference["stdout"]
    assert f"submitted job {job_id}" in stdout and str(run_dir) in stdout
    assert f"tensorboard --logdir {run_dir / 'tb'}" in stdout
    job_folder = run_dir / "slurm" / str(job_id)
    assert f"{job_folder}/{job_id}_0_log.out" in stdout
    for rank in (0, 1):
        assert "Job completed successfully" in (job_folder / f"{job_id}_{rank}_log.out").read_text()
    assert (job_folder / f"{job_id}_0_result.pkl").is_file()
    assert sorted(logged_steps(run_dir)) == list(range(1, STEPS + 1))
    assert (run_dir / "checkpoints" / f"step-{STEPS}" / "manifest.json").is_file()
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert "resumed from" not in (job_folder / f"{job_id}_0_log.err").read_text()
    # The folders that hold the pickles are writable by their owner only.
    for folder in (run_dir, run_dir / "slurm", job_folder):
        assert not submit.writable_by_others(folder), folder


def test_submitit_interrupts_sigterm_then_usr2_and_usr2_alone(cleanup, reference, tmp_path, digits_cache) -> None:
    """`job._interrupt()` sends SIGTERM then USR2 (a preemption: SIGTERM must not kill a rank);
    `job._interrupt(timeout=True)` sends USR2 alone. Two requeues, one job id, exact weights."""
    slurm, run_dir = cleanup, tmp_path / "run"
    job = submit_job(run_dir, digits_cache)
    job_id = int(job.job_id)
    sent = interrupt_when_training(slurm, job_id, run_dir, EVERY + 1, job._interrupt)
    steps_before = max(logged_steps(run_dir))
    wait_until(lambda: len(ledger_events(run_dir, "start")) >= 2, timeout=JOB_TIMEOUT_S, what="the second run")
    resumed_at = ledger_events(run_dir, "start")[1]["step"]
    sent_again = interrupt_when_training(slurm, job_id, run_dir, resumed_at + 2,
                                         lambda: job._interrupt(timeout=True))
    steps_before_again = max(step for step in logged_steps(run_dir))
    assert_clean_end(slurm, job_id, run_dir, restarts=2)
    print(f"interrupt -> training again: {check_usr2_cycle(run_dir, 0, sent, steps_before, 'preemption'):.1f} s, "
          f"{check_usr2_cycle(run_dir, 1, sent_again, steps_before_again, 'preemption'):.1f} s")
    assert_bitwise_equal(run_dir, reference["wait"]())


def test_real_time_limit_requeues_as_a_timeout(cleanup, tmp_path, digits_cache) -> None:
    """--time 2 with a 40 s signal delay: Slurm's own USR2. Its timer runs every 30 s and signals
    once warn time + 30 s reach the end, so it lands 50-80 s after the job starts. (With --time 1 it
    could land the moment a run started: in CI it once killed a task 0.23 s after launch, before
    Python had installed any handler.) 480 steps (1.5-2 min here) keep the first run training past
    that window; the bitwise comparison with a reference is the other tests' job (same signal path)."""
    slurm, run_dir = cleanup, tmp_path / "run"
    job = submit_job(run_dir, digits_cache, "--time", "2", "--signal-delay", "40", steps=480, every=40)
    job_id = int(job.job_id)
    wait_until(lambda: ledger_events(run_dir, "stop"), timeout=180, what="the time-limit stop")
    stop = ledger_events(run_dir, "stop")[0]
    assert stop["kind"] == "timeout" and stop["requeue"] is True and stop["step"] >= 1
    # Give the requeued run room to finish (a second two-minute run would time out again).
    slurm.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")
    assert_clean_end(slurm, job_id, run_dir, restarts=1)
    assert ledger_events(run_dir, "start")[1]["step"] == stop["step"]
    ledger = json.loads((run_dir / LEDGER_NAME).read_text())
    assert (ledger["timeouts"], ledger["preemptions"]) == (1, 0)
    assert (run_dir / "checkpoints" / "step-480" / "manifest.json").is_file()
    assert set(logged_steps(run_dir)) >= set(range(1, 481)) - {stop["step"]}


def test_hard_requeue_resumes_from_the_last_periodic_checkpoint(cleanup, reference, tmp_path, digits_cache) -> None:
    """`scontrol requeue`: SIGTERM (ignored while training), SIGKILL after KillWait, no USR2."""
    slurm, run_dir = cleanup, tmp_path / "run"
    job = submit_job(run_dir, digits_cache)
    job_id = int(job.job_id)
    interrupt_when_training(slurm, job_id, run_dir, EVERY + 1,
                            lambda: slurm.run("scontrol", "requeue", str(job_id)))
    assert_clean_end(slurm, job_id, run_dir, restarts=1)
    assert ledger_events(run_dir, "stop") == []  # no USR2 path, no bookkeeping of a requeue
    resumed_at = ledger_events(run_dir, "start")[1]["step"]
    assert resumed_at >= EVERY and resumed_at % EVERY == 0
    assert_bitwise_equal(run_dir, reference["wait"]())


@pytest.mark.parametrize(("flags", "message"), [
    (["--partition", "nosuch"], "slurm.partition='nosuch' does not exist; partitions: debug"),
    (["--nodes", "3"], "slurm.nodes=3 but partition 'debug' has 2 node(s)"),
    (["--cpus-per-task", "5"], "needs 5 CPUs per node; nodes of 'debug' have at most 4"),  # max(4, host CPUs): start.sh
    (["optim.lr=fast"], "optim.lr"),
])
def test_bad_submissions_fail_before_anything_is_queued(cleanup, tmp_path, capsys, flags, message) -> None:
    before = cleanup.active_jobs()
    argv = ["--config", str(DEMO), "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", *flags,
            f"train.run_dir={tmp_path / 'run'}"]
    assert submit.main(argv) == 2
    assert message in capsys.readouterr().err
    assert cleanup.active_jobs() == before
    assert not (tmp_path / "run" / "slurm").exists()


def test_missing_config_and_open_folder_exit_2_through_the_launch_script(cleanup, tmp_path) -> None:
    script = REPO_ROOT / "launch" / "submit.py"
    python = sys.executable
    missing = subprocess.run([python, str(script), "--config", str(tmp_path / "none.yaml")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "config file not found" in missing.stderr
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    refused = subprocess.run([python, str(script), "--config", str(DEMO), *RESOURCES, f"train.run_dir={open_dir}"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "writable by group or others" in refused.stderr
    assert not (open_dir / "slurm").exists()


def sbatch_template(slurm, run_dir: Path, tmp_path: Path, cache: Path) -> int:
    """Submit slurm/rkan_dist.sbatch with the demo on the dev cluster's two nodes; returns the job id."""
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={REPO_ROOT}", "-N2", "--ntasks-per-node=1", "--cpus-per-task=1",
         "--gres=none", "--time=30", f"--output={tmp_path}/sbatch-%j.out", f"--export=ALL,PYTHON={sys.executable}",
         str(REPO_ROOT / "slurm" / "rkan_dist.sbatch"), "--config", str(DEMO), *overrides(run_dir, cache)],
        capture_output=True, text=True, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    job_id = int(submitted.stdout.strip().split(";")[0])
    slurm.submitted.append(job_id)
    return job_id


def test_sbatch_template_forwards_batch_usr2_and_requeues(cleanup, reference, tmp_path, digits_cache) -> None:
    """slurm/rkan_dist.sbatch: USR2 to the batch shell only (as `--signal=B:USR2` does) -> the
    trap forwards it to the tasks -> checkpoint, requeue, exact resume; same ledger as submitit."""
    slurm, run_dir = cleanup, tmp_path / "run"
    job_id = sbatch_template(slurm, run_dir, tmp_path, digits_cache)
    sent = interrupt_when_training(slurm, job_id, run_dir, EVERY + 1,
                                   lambda: slurm.run("scancel", "--batch", "--signal=USR2", str(job_id)))
    steps_before = max(logged_steps(run_dir))
    assert_clean_end(slurm, job_id, run_dir, restarts=1)
    print(f"sbatch: batch USR2 -> training again: {check_usr2_cycle(run_dir, 0, sent, steps_before, 'preemption'):.1f} s")
    output = (tmp_path / f"sbatch-{job_id}.out").read_text()
    assert "asking every task to checkpoint and stop" in output
    assert "srun ended with status 0" in output and f"status: finished at step {STEPS}" in output
    assert_bitwise_equal(run_dir, reference["wait"]())


# ----------------------------------------------------------------------------- faults: crash, budget, errors

def kill_task(run_dir: Path, rank: int, signum: int = 9) -> int:
    pid = wait_until(lambda: task_pid(run_dir, rank), timeout=30, what=f"rank {rank}'s process")
    os.kill(pid, signum)
    return pid


def test_a_killed_rank_restarts_the_job_which_finishes_bitwise(cleanup, reference, tmp_path, digits_cache) -> None:
    """SIGKILL of rank 1 after a checkpoint (an OOM kill, a segfault): srun ends the step, the batch
    script records the crash and requeues; the job finishes by itself, exactly. With train.resume=none:
    that is how the first start begins, the requeued one continues from the job's own checkpoint."""
    slurm, run_dir = cleanup, tmp_path / "run"
    job = submit_job(run_dir, digits_cache, "train.resume=none")
    job_id = int(job.job_id)
    interrupt_when_training(slurm, job_id, run_dir, EVERY + 1, lambda: kill_task(run_dir, 1))
    assert_clean_end(slurm, job_id, run_dir, restarts=1)
    (failure,) = ledger_events(run_dir, "failure")
    assert (failure["kind"], failure["rank"], failure["exit"], failure["job_id"]) == ("crash", 1, "Killed", str(job_id))
    (restart,) = ledger_events(run_dir, "restart")
    assert restart["after"] == "crash" and restart["step"] % EVERY == 0 and restart["step"] >= EVERY
    assert restart["steps_lost"] == failure["step"] - restart["step"] >= 0
    batch_err = (run_dir / "slurm" / str(job_id) / f"{job_id}_0_log.err").read_text()
    assert f"restart 1 of 3 from {run_dir}/checkpoints/step-{restart['step']}: requeueing job {job_id}" in batch_err
    assert_bitwise_equal(run_dir, reference["wait"]())


def test_a_spent_failure_budget_ends_the_job_with_one_line(cleanup, tmp_path, digits_cache) -> None:
    """slurm.max_num_failures=1 and two crashes: the second ends the job, named with the first, and
    every checkpoint stays valid."""
    from rkan_dist.manifest import validate

    slurm, run_dir = cleanup, tmp_path / "run"
    job = submit_job(run_dir, digits_cache, "slurm.max_num_failures=1")
    job_id = int(job.job_id)
    interrupt_when_training(slurm, job_id, run_dir, EVERY + 1, lambda: kill_task(run_dir, 1))
    wait_until(lambda: ledger_events(run_dir, "restart"), timeout=JOB_TIMEOUT_S, what="the restart")
    resumed = ledger_events(run_dir, "restart")[0]["step"]
    interrupt_when_training(slurm, job_id, run_dir, resumed + 1, lambda: kill_task(run_dir, 0, signal.SIGSEGV))
    record = slurm.wait_for(job_id, "FAILED", timeout=JOB_TIMEOUT_S, min_restarts=1)
    assert record["Restarts"] == "1"
    failures = ledger_events(run_dir, "failure")
    assert [(event["kind"], event["rank"]) for event in failures] == [("crash", 1), ("crash", 0)]
    assert failures[1]["exit"] == "Segmentation fault"
    (gave_up,) = ledger_events(run_dir, "gave_up")
    assert (gave_up["failures"], gave_up["budget"]) == (2, 1)
    batch_err = (run_dir / "slurm" / str(job_id) / f"{job_id}_0_log.err").read_text()
    lines = [line for line in batch_err.splitlines() if "gave up" in line]
    assert len(lines) == 1 and lines[0].startswith(
        f"rkan-dist: gave up after 2 failures (crash of rank 1 at step {failures[0]['step']}, crash of rank 0 at "
        f"step {failures[1]['step']}); latest checkpoint {run_dir}/checkpoints/step-"), lines
    steps = sorted(int(path.name.removeprefix("step-")) for path in (run_dir / "checkpoints").glob("step-*"))
    assert steps and all(step % EVERY == 0 for step in steps)
    for step in steps:
        validate(run_dir / "checkpoints" / f"step-{step}")


def test_a_data_path_gone_before_the_restart_fails_once_without_looping(cleanup, tmp_path, digits_cache) -> None:
    """The train file vanishes while the job waits to be requeued (a preemption): the requeued run
    meets a configuration error, says so in one line, and is not restarted again."""
    from rkan_dist.data.demo import ensure_digits

    slurm, run_dir = cleanup, tmp_path / "run"
    train = tmp_path / "train.beton"
    shutil.copy(ensure_digits(digits_cache).train_beton, train)
    job = submit_job(run_dir, digits_cache, "data.dataset=files", f"data.train_path={train}",
                     f"data.val_path={ensure_digits(digits_cache).val_beton}")
    job_id = int(job.job_id)
    interrupt_when_training(slurm, job_id, run_dir, EVERY + 1,
                            lambda: slurm.run("scancel", "--signal=USR2", str(job_id)))
    wait_until(lambda: ledger_events(run_dir, "stop"), timeout=JOB_TIMEOUT_S, what="the USR2 stop")
    train.unlink()
    record = slurm.wait_for(job_id, "FAILED", timeout=JOB_TIMEOUT_S, min_restarts=1)
    assert record["Restarts"] == "1" and record["ExitCode"] != "0:0"
    (error,) = ledger_events(run_dir, "error")
    assert error["kind"] == "config" and f"no such .beton file '{train}'" in error["message"]
    assert ledger_events(run_dir, "failure") == []
    logs = "".join(path.read_text() for path in (run_dir / "slurm" / str(job_id)).glob("*_log.err"))
    assert f"rkan-dist task: error: data.train_path: no such .beton file '{train}'" in logs
    assert "not restarted: data.train_path" in logs and "Traceback" not in logs


def test_sbatch_template_restarts_a_killed_rank(cleanup, reference, tmp_path, digits_cache) -> None:
    """slurm/rkan_dist.sbatch, without submitit: the same crash -> requeue -> exact finish."""
    slurm, run_dir = cleanup, tmp_path / "run"
    job_id = sbatch_template(slurm, run_dir, tmp_path, digits_cache)
    interrupt_when_training(slurm, job_id, run_dir, EVERY + 1, lambda: kill_task(run_dir, 1))
    assert_clean_end(slurm, job_id, run_dir, restarts=1)
    (failure,) = ledger_events(run_dir, "failure")
    assert (failure["kind"], failure["rank"], failure["exit"]) == ("crash", 1, "Killed")
    output = (tmp_path / f"sbatch-{job_id}.out").read_text()
    assert f"restart 1 of 3 from {run_dir}/checkpoints/step-" in output and f"requeueing job {job_id}" in output
    assert f"status: finished at step {STEPS}" in output
    assert_bitwise_equal(run_dir, reference["wait"]())


def test_usr2_in_the_first_second_of_a_task_requeues_and_finishes_bitwise(cleanup, reference, tmp_path,
                                                                           digits_cache) -> None:
    """USR2 to every task 0, 0.3 and 0.8 s after the task's process appears (the interpreter starting,
    imports, unpickling): each run of the job ends in a requeue, never in a job killed for good."""
    slurm, run_dir = cleanup, tmp_path / "run"
    job = submit_job(run_dir, digits_cache)
    job_id = int(job.job_id)
    delays = (0.0, 0.3, 0.8)
    for restart, delay in enumerate(delays):
        wait_until(lambda restart=restart: task_pid(run_dir, 0, restart), timeout=JOB_TIMEOUT_S, poll=0.005,
                   what=f"run {restart}'s task")
        time.sleep(delay)
        slurm.run("scancel", "--signal=USR2", str(job_id))
        slurm.wait_for(job_id, ["PENDING", "REQUEUED", "RUNNING", "COMPLETED"], timeout=120, min_restarts=restart + 1)
    assert_clean_end(slurm, job_id, run_dir, restarts=len(delays))
    # Each early signal is a preemption: noted by the task's handler, or (in the interpreter's first
    # milliseconds, before any handler) by after-srun from srun's report; never a failure.
    stops = ledger_events(run_dir, "stop")
    assert [stop["kind"] for stop in stops] == ["preemption"] * len(delays), stops
    assert ledger_events(run_dir, "failure") == [] and ledger_events(run_dir, "gave_up") == []
    assert_bitwise_equal(run_dir, reference["wait"]())


def test_a_stopped_rank_is_a_hang_detected_dumped_and_restarted_bitwise(cleanup, reference, tmp_path,
                                                                        digits_cache) -> None:
    """SIGSTOP of rank 1 (a hung collective, a stuck file system) with parallel.hang_timeout_s=60:
    detected within twice the timeout, the live rank's stacks dumped, the job restarted by itself."""
    slurm, run_dir = cleanup, tmp_path / "run"
    job = submit_job(run_dir, digits_cache, "parallel.hang_timeout_s=60")
    job_id = int(job.job_id)
    stopped: list[int] = []
    try:
        sent = interrupt_when_training(slurm, job_id, run_dir, EVERY + 1,
                                       lambda: stopped.append(kill_task(run_dir, 1, signal.SIGSTOP)))
        failure = wait_until(lambda: ledger_events(run_dir, "failure"), timeout=240, what="the hang")[0]
        assert (failure["kind"], failure["rank"], failure["job_id"]) == ("hang", 1, str(job_id)), failure
        assert failure["time"] - sent <= 2 * 60, f"detected {failure['time'] - sent:.0f} s after the SIGSTOP"
        assert_clean_end(slurm, job_id, run_dir, restarts=1)
    finally:  # never leave a stopped process behind
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    (dump_dir,) = list((run_dir / "hangs").iterdir())
    stacks = (dump_dir / "rank0.txt").read_text()
    assert "File " in stacks and "rank 1" in stacks, stacks[:2000]
    (restart,) = ledger_events(run_dir, "restart")
    assert restart["after"] == "hang" and restart["lost_seconds"] >= 60
    assert_bitwise_equal(run_dir, reference["wait"]())
