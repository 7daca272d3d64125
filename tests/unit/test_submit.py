"""rkan-dist submit without a cluster: flags -> sbatch parameters, the dry-run script, sweeps (grids:
tests/unit/test_grid.py),
folder permissions, and the pure decisions of the requeue protocol (time limit vs preemption,
the time-limit budget). The real cluster runs in tests/slurm/test_submit.py."""

from __future__ import annotations

import argparse
import os
import pickle
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rkan_dist import after_srun, grid, slurm_cluster, slurm_task, submit
from rkan_dist.config import SlurmConfig, config_from_dict, load_config
from rkan_dist.faults import ConfigError
from rkan_dist.ledger import EventLedger

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = str(REPO_ROOT / "configs" / "demo.yaml")


def dry_run(capsys, tmp_path: Path, *args: str) -> tuple[int, str, str]:
    code = submit.main(["--config", DEMO, "--dry-run", *args, f"train.run_dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    return code, out, err


def sbatch_flags(script: str) -> dict[str, str]:
    flags = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line.removeprefix("#SBATCH --").partition("=")
            flags[key] = value
    return flags


def test_tasks_per_node_follows_gpus_and_explicit_value_wins() -> None:
    assert slurm_cluster.tasks_per_node(SlurmConfig(gpus_per_node=8)) == 8
    assert slurm_cluster.tasks_per_node(SlurmConfig(gpus_per_node=0)) == 1
    assert slurm_cluster.tasks_per_node(SlurmConfig(gpus_per_node=4, tasks_per_node=2)) == 2


def test_sbatch_parameters_map_every_slurm_field() -> None:
    config = SlurmConfig(partition="gpu", nodes=4, gpus_per_node=8, cpus_per_task=10, time_minutes=600,
                         account="proj", qos="high", constraint="a100", mem="400G", exclude="node[01-02]",
                         signal_delay_s=90)
    params = submit.sbatch_parameters(config, job_name="rkan-dist-x")
    # around srun: a failed task ends the step; the lines before and after it restart the job (tested below)
    assert params.pop("srun_args") == ["--kill-on-bad-exit=1"]
    assert params.pop("setup") == after_srun.batch_setup_lines() and "teardown" not in params
    assert params == {
        "job_name": "rkan-dist-x", "nodes": 4, "ntasks_per_node": 8, "cpus_per_task": 10, "time": 600,
        "signal_delay_s": 90, "additional_parameters": {"requeue": True}, "gres": "gpu:8", "partition": "gpu",
        "account": "proj", "qos": "high", "constraint": "a100", "mem": "400G", "exclude": "node[01-02]",
    }
    # CPU only: no gres at all, and empty strings leave Slurm's defaults alone.
    cpu = submit.sbatch_parameters(SlurmConfig(gpus_per_node=0), job_name="j")
    assert "gres" not in cpu and "partition" not in cpu and "account" not in cpu
    assert cpu["ntasks_per_node"] == 1


def test_dry_run_prints_the_sbatch_script_and_creates_nothing(capsys, tmp_path: Path) -> None:
    code, out, _ = dry_run(capsys, tmp_path, "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "6",
                           "--time", "90", "--signal-delay", "30", "--partition", "gpu", "--exclude", "n[1-2]")
    assert code == 0
    flags = sbatch_flags(out)
    assert flags["nodes"] == "2" and flags["ntasks-per-node"] == "4" and flags["gres"] == "gpu:4"
    assert flags["cpus-per-task"] == "6" and flags["time"] == "90" and flags["partition"] == "gpu"
    assert flags["signal"] == "USR2@30"  # every task gets USR2, not only the batch shell
    assert flags["exclude"] == "'n[1-2]'"  # a hostlist stays a string through the YAML overrides
    assert "requeue" in flags
    run_dir = tmp_path / "run"
    assert flags["output"] == f"{run_dir}/slurm/%j/%j_0_log.out"
    assert "-u -m rkan_dist.task_start -u -m submitit.core._submit" in out  # signal-safe from its first import
    assert f"run folder: {run_dir}" in out and "nothing submitted" in out
    assert not run_dir.exists()
    # srun, then the restart decision with srun's status, for this run folder and budget
    lines = out.splitlines()
    srun = next(index for index, line in enumerate(lines) if line.startswith("srun "))
    assert "--kill-on-bad-exit=1" in lines[srun]
    assert "export RKAN_ATTEMPT_STARTED=$(date +%s.%N)" in lines[:srun]
    teardown = next(line for line in lines[srun:] if "rkan_dist.after_srun" in line)
    assert (f"-m rkan_dist.after_srun --status $? --max-failures 3 --exclude-after-failures 1 --min-nodes 2 "
            f"--run-dir {run_dir}") in teardown
    assert all(not line.strip() or line.startswith("#") for line in lines[srun + 1:lines.index(teardown)])


def test_dry_run_on_cpu_has_no_gres_and_one_task_per_node(capsys, tmp_path: Path) -> None:
    code, out, _ = dry_run(capsys, tmp_path, "--gpus-per-node", "0", "--nodes", "3")
    flags = sbatch_flags(out)
    assert code == 0 and "gres" not in flags and flags["ntasks-per-node"] == "1" and flags["nodes"] == "3"


def test_flags_override_config_and_overrides(capsys, tmp_path: Path) -> None:
    code, out, _ = dry_run(capsys, tmp_path, "--nodes", "5", "slurm.nodes=2", "slurm.time_minutes=7")
    flags = sbatch_flags(out)
    assert code == 0 and flags["nodes"] == "5" and flags["time"] == "7"


def test_sweep_is_one_array_with_a_run_folder_per_value(capsys, tmp_path: Path) -> None:
    code, out, _ = dry_run(capsys, tmp_path, "--sweep", "optim.lr=0.1,0.4,0.8")
    assert code == 0
    assert sbatch_flags(out)["array"] == "0-2%3"
    for value in ("0.1", "0.4", "0.8"):
        assert f"run folder: {tmp_path / 'run' / f'optim.lr={value}'}" in out
    args = submit.build_parser().parse_args(["--config", DEMO, "--sweep", "optim.lr=0.1,0.4",
                                             f"train.run_dir={tmp_path}"])
    prepared = submit.prepare(args)
    assert [config.optim.lr for config in prepared.configs] == [0.1, 0.4]
    assert len({config.train.run_dir for config in prepared.configs}) == 2


@pytest.mark.parametrize("text", ["optim.lr", "lr=0.1,0.2", "optim.lr=", "optim.lr=1,1"])
def test_bad_sweep_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--grid"):  # --sweep is a one-key --grid (rkan_dist.grid)
        grid.parse_axis(text)


@pytest.mark.parametrize(("args", "message"), [
    (["--config", "/no/such.yaml"], "config file not found"),
    (["--config", DEMO, "optim.lrr=1"], "unknown key 'optim.lrr'; did you mean 'optim.lr'"),
    (["--config", DEMO, "--nodes", "0"], "slurm.nodes must be >= 1"),
    (["--config", DEMO, "--sweep", "optim.lr=0.1,abc"], "optim.lr"),
    (["--config", DEMO, "--sweep", "optim.nope=1,2"], "optim.nope"),
])
def test_bad_submissions_exit_2_with_a_clear_message(capsys, args: list[str], message: str) -> None:
    assert submit.main([*args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rkan-dist submit: error:") and message in err


def test_a_run_folder_others_can_write_is_refused(capsys, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o775)
    code, _, err = dry_run(capsys, tmp_path)
    assert code == 2 and "writable by group or others" in err and str(run_dir) in err
    run_dir.chmod(0o755)
    (run_dir / "slurm").mkdir(mode=0o777)
    (run_dir / "slurm").chmod(0o757)
    code, _, err = dry_run(capsys, tmp_path)
    assert code == 2 and str(run_dir / "slurm") in err
    (run_dir / "slurm").chmod(0o700)
    assert dry_run(capsys, tmp_path)[0] == 0


def test_private_folders_and_umask(tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    loose.mkdir()
    loose.chmod(0o777)
    submit.make_private_folder(loose)
    submit.make_private_folder(tmp_path / "new" / "slurm")
    for path in (loose, tmp_path / "new", tmp_path / "new" / "slurm"):
        assert not submit.writable_by_others(path), stat.filemode(path.stat().st_mode)
    before = os.umask(0o002)
    try:
        with submit.restrictive_umask():
            (tmp_path / "made-under-umask").mkdir(mode=0o777)
        assert os.umask(0o002) == 0o002  # restored
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "made-under-umask").stat().st_mode) == 0o755


@pytest.mark.parametrize(("text", "seconds"), [
    ("0:45", 45), ("12:34", 754), ("1:02:03", 3723), ("2-01:00:00", 2 * 86400 + 3600),
    ("UNLIMITED", None), ("INVALID", None), ("", None),
])
def test_parse_slurm_duration(text: str, seconds: float | None) -> None:
    assert slurm_cluster.parse_slurm_duration(text) == seconds


def test_classify_stop_tells_time_limit_from_preemption() -> None:
    assert slurm_task.classify_stop(100, signal_delay_s=120, saw_sigterm=False) == "timeout"
    assert slurm_task.classify_stop(120 + slurm_task.TIMEOUT_MARGIN_S, 120, False) == "timeout"  # a late timer
    assert slurm_task.classify_stop(3600, 120, False) == "preemption"
    assert slurm_task.classify_stop(100, 120, saw_sigterm=True) == "preemption"  # SIGTERM came first
    assert slurm_task.classify_stop(None, 120, False) == "preemption"  # unknown: never burn the budget


def test_time_limits_are_budgeted_preemptions_are_not() -> None:
    assert slurm_task.decide_requeue("preemption", timeouts_so_far=99, max_num_timeout=0).requeue
    assert slurm_task.decide_requeue("timeout", 0, 3).requeue
    assert slurm_task.decide_requeue("timeout", 2, 3).requeue
    last = slurm_task.decide_requeue("timeout", 3, 3)
    assert not last.requeue and "max_num_timeout=3" in last.reason
    assert not slurm_task.decide_requeue("timeout", 0, 0).requeue


def test_ledger_counts_and_keeps_events(tmp_path: Path) -> None:
    ledger = EventLedger(tmp_path)
    assert ledger.read() == {"timeouts": 0, "preemptions": 0, "events": []}
    ledger.append({"event": "start"})
    ledger.append({"event": "stop", "kind": "timeout"}, count="timeouts")
    data = ledger.append({"event": "stop", "kind": "preemption"}, count="preemptions")
    assert (data["timeouts"], data["preemptions"]) == (1, 1)
    assert [event["event"] for event in EventLedger(tmp_path).read()["events"]] == ["start", "stop", "stop"]


def test_the_pickled_job_holds_the_config_and_no_model_state(tmp_path: Path) -> None:
    config = load_config(DEMO, [f"train.run_dir={tmp_path}"])
    from rkan_dist.config import config_to_dict

    job = slurm_task.TrainingJob(config_to_dict(config))
    payload = pickle.dumps(job)
    assert len(payload) < 10_000  # a config, not weights
    restored = pickle.loads(payload)
    assert config_from_dict(restored.config_dict) == config
    fresh = job.checkpoint()
    assert isinstance(fresh.function, slurm_task.TrainingJob) and fresh.function is not job
    assert fresh.function.config_dict == job.config_dict


def test_flag_overrides_quote_strings() -> None:
    args = argparse.Namespace(**{flag: None for flag in submit.FLAG_KEYS})
    args.partition, args.nodes = "0", 2
    assert submit.flag_overrides(args) == ["slurm.nodes=2", 'slurm.partition="0"']


def test_a_usr2_during_start_up_is_kept_for_the_trainer_not_fatal():
    """Inside a Slurm task the module notes USR2 from import on; StopSignals then starts stopped."""
    code = ("import os, signal\n"
            "import rkan_dist.slurm_task as task\n"
            "os.kill(os.getpid(), signal.SIGUSR2)\n"
            "print(task.StopSignals().install().stop_requested)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    in_task = subprocess.run([sys.executable, "-c", code], env={**env, "SLURM_STEP_ID": "0"},
                             capture_output=True, text=True, timeout=120)
    assert in_task.returncode == 0 and in_task.stdout.strip() == "True", in_task.stderr
    outside = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert outside.returncode == -signal.SIGUSR2  # elsewhere importing the module changes no handler


def test_a_usr2_while_submitit_holds_its_own_handler_reaches_the_task_not_submitit() -> None:
    """submitit installs a USR2 handler that requeues the job (no ledger event) just before it calls the
    job, which installs StopSignals a moment later. A USR2 in between (most likely on a slow CPU) must
    reach StopSignals; submitit's handler must never run."""
    code = ("import os, signal\n"
            "import rkan_dist.stops as stops\n"  # what rkan_dist.task_start imports first
            "foreign = []\n"
            "signal.signal(signal.SIGUSR2, lambda *_: foreign.append('USR2'))\n"  # submitit's _handle_signals
            "signal.signal(signal.SIGTERM, lambda *_: foreign.append('TERM'))\n"
            "os.kill(os.getpid(), signal.SIGUSR2)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "signals = stops.StopSignals('slurm').install()\n"
            "print(foreign, signals.stop_requested, signals.signal_name, signals.saw_sigterm)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run([sys.executable, "-c", code], env={**env, "SLURM_STEP_ID": "0"}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["[]", "True", "SIGUSR2", "True"], result.stderr


@pytest.mark.parametrize(("gres", "gpus"), [
    ("(null)", 0), ("gpu:8", 8), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:4(S:0-1),gpu:v100:2", 6),
    ("gpu:a100:2(S:0),mps:100", 2), ("", 0),
])
def test_gpus_in_sinfo_gres(gres, gpus) -> None:
    assert slurm_cluster.gpus_in_gres(gres) == gpus


@pytest.mark.parametrize(("text", "mb"), [("64000", 64000), ("512M", 512), ("400G", 409600), ("1T", 1048576),
                                          ("2048K", 2), ("16gb", 16384), ("lots", None), ("1.5G", None)])
def test_slurm_memory_sizes_in_mb(text, mb) -> None:
    assert slurm_cluster.memory_mb(text) == mb


def test_the_demo_recipe_asks_for_cpus_only() -> None:
    """The dev cluster has no GPUs and 4 CPUs per node (slurm/dev-cluster/start.sh): the demo must fit it as it is."""
    slurm = load_config(DEMO).slurm
    assert (slurm.nodes, slurm.gpus_per_node, slurm_cluster.tasks_per_node(slurm), slurm.cpus_per_task) == (2, 0, 1, 1)
    assert "gres" not in submit.sbatch_parameters(slurm, "demo")


def test_task_start_runs_the_module_python_m_would() -> None:
    from rkan_dist.task_start import module_and_argv

    assert module_and_argv(["-u", "-m", "submitit.core._submit", "/f"]) == ("submitit.core._submit",
                                                                            ["submitit.core._submit", "/f"])
    assert module_and_argv(["-m", "pkg.mod"]) == ("pkg.mod", ["pkg.mod"])
    with pytest.raises(SystemExit, match="usage"):
        module_and_argv(["script.py"])


def test_task_start_notes_usr2_and_sigterm_before_the_module_runs(tmp_path: Path) -> None:
    """A USR2 and a SIGTERM that reach a Slurm task while it imports are kept, not fatal."""
    (tmp_path / "probe.py").write_text(
        "import os, signal\n"
        "os.kill(os.getpid(), signal.SIGUSR2)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "from rkan_dist.stops import StopSignals\n"
        "stops = StopSignals('slurm').install()\n"
        "print(stops.stop_requested, stops.saw_sigterm)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_STEP_ID="0", PYTHONPATH=f"{tmp_path}{os.pathsep}{env.get('PYTHONPATH', '')}")
    result = subprocess.run([sys.executable, "-u", "-m", "rkan_dist.task_start", "-u", "-m", "probe"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split() == ["True", "True"], result.stderr


@pytest.mark.parametrize(("text", "expected"), [
    ("srun: error: n2: task 1: Killed\nsrun: Terminating StepId=5.0\nsrun: error: n1: task 0: Killed\n",
     (1, "n2", "Killed")),
    ("x\nsrun: error: n1: tasks 0-1: Exited with exit code 2\n", (0, "n1", "Exited with exit code 2")),
    ("", (None, None, "srun failed")),
])
def test_first_failed_task_is_the_cause_srun_reported(text, expected) -> None:
    assert after_srun.first_failed_task(text) == expected


def _events(*items: tuple[float, dict]) -> list[dict]:
    return [{"time": time, **event} for time, event in items]


def test_restart_after_srun_decides_from_status_and_ledger() -> None:
    decide = after_srun.restart_after_srun
    start = {"event": "start", "job_id": "7"}
    crash = {"event": "failure", "kind": "crash", "job_id": "7", "rank": 1, "step": 6}
    # success, or a USR2 stop (rank 0 requeued): nothing to do
    assert decide(0, _events((10, start)), 10, "7", 3)[0] == "done"
    assert decide(137, _events((10, start), (12, {"event": "stop", "kind": "preemption"})), 10, "7", 3)[0] == "done"
    # an error no restart fixes, in this run of the job
    error = {"event": "error", "kind": "config", "message": "data.train_path ... does not exist"}
    assert decide(2, _events((10, start), (11, error)), 10, "7", 3) == ("no_restart", {"time": 11, **error})
    # ... but one of an earlier run (since fixed) does not stop this run's restart
    assert decide(1, _events((1, error), (10, start), (12, crash)), 10, "7", 3)[0] == "restart"
    # the budget counts this job's failures only: a resubmission starts afresh
    earlier = [(float(t), {**crash, "job_id": "6"}) for t in range(3)]
    ours = [(float(t), crash) for t in range(4, 7)]
    assert decide(1, _events(*earlier, *ours), 4, "7", 3)[0] == "restart"  # 3 of 3
    assert decide(1, _events(*earlier, *ours, (8, crash)), 8, "7", 3)[0] == "give_up"  # a 4th
    # a pending failure a rank wrote (hang, save) is the one that restarts
    hang = {"event": "failure", "kind": "hang", "job_id": "7", "rank": 1, "step": 9}
    assert decide(1, _events((10, start), (40, hang)), 10, "7", 3) == ("restart", {"time": 40, **hang})


def test_launcher_variables_of_the_submitting_shell_never_reach_the_job(monkeypatch) -> None:
    """A MASTER_PORT left by a torchrun (or a process group) in the submitting process would be every
    job's rendezvous port: sbatch must not see it, and the shell keeps it."""
    monkeypatch.setenv("MASTER_PORT", "52303")
    monkeypatch.setenv("RANK", "0")
    with submit.without_launcher_variables():
        assert not {"MASTER_PORT", "RANK"} & set(os.environ)
    assert (os.environ["MASTER_PORT"], os.environ["RANK"]) == ("52303", "0")
