"""`rkan-dist submit`: multi-node training on Slurm through submitit, with checkpoint-and-requeue.

    rkan-dist submit --config CONFIG [--nodes N] [--gpus-per-node G] [--partition P] [--time MIN]
                     [--dry-run] [--sweep key=v1,v2,...] [section.key=value ...]

The submission is checked against the cluster (rkan_dist.slurm_cluster) and pickles a
`TrainingJob` that holds only the resolved config (never model state); inside the job every task
runs rkan_dist.slurm_task, and the batch script ends with rkan_dist.after_srun, which restarts the
job after a failed step. docs/SLURM.md and docs/FAULTS.md say what happens on a preemption, a time
limit and a crash.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from rkan_dist.after_srun import batch_setup_lines, batch_teardown_lines
from rkan_dist.config import Config, SlurmConfig, config_to_dict, load_config
from rkan_dist.faults import EXIT_USAGE, ConfigError, outcome_of
from rkan_dist.slurm_cluster import SubmitError, check_against_cluster, tasks_per_node
from rkan_dist.slurm_task import TrainingJob

# CLI flag -> config key; flags are applied after the YAML file and the overrides, so they win.
FLAG_KEYS = {
    "nodes": "slurm.nodes", "gpus_per_node": "slurm.gpus_per_node", "tasks_per_node": "slurm.tasks_per_node",
    "cpus_per_task": "slurm.cpus_per_task", "partition": "slurm.partition", "time": "slurm.time_minutes",
    "account": "slurm.account", "qos": "slurm.qos", "constraint": "slurm.constraint", "mem": "slurm.mem",
    "exclude": "slurm.exclude", "signal_delay": "slurm.signal_delay_s",
}

def sbatch_parameters(slurm: SlurmConfig, job_name: str, run_dirs: list[Path] | None = None) -> dict[str, Any]:
    """The submitit SlurmExecutor parameters (= sbatch flags, plus the lines around srun) for a SlurmConfig.

    srun ends the step as soon as one task fails (--kill-on-bad-exit: a SIGKILL also ends a
    stopped task, which a hung collective would otherwise keep waiting for); the batch script
    then runs `after-srun`, which restarts the job from its latest checkpoint (see after_srun)."""
    params: dict[str, Any] = {
        "job_name": job_name, "nodes": slurm.nodes, "ntasks_per_node": tasks_per_node(slurm),
        "cpus_per_task": slurm.cpus_per_task, "time": slurm.time_minutes,
        "signal_delay_s": slurm.signal_delay_s, "additional_parameters": {"requeue": True},
        "srun_args": ["--kill-on-bad-exit=1"], "setup": batch_setup_lines(),
    }
    if run_dirs:
        params["teardown"] = batch_teardown_lines(run_dirs, slurm.max_num_failures)
    if slurm.gpus_per_node > 0:
        params["gres"] = f"gpu:{slurm.gpus_per_node}"
    for name in ("partition", "account", "qos", "constraint", "mem", "exclude"):
        if getattr(slurm, name):
            params[name] = getattr(slurm, name)
    return params


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """`--nodes 2` -> 'slurm.nodes=2'; strings are quoted so YAML keeps 'n[1-2]' or '0' a string."""
    overrides = []
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return overrides


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """'optim.lr=0.1,0.2' -> ('optim.lr', ['0.1', '0.2'])."""
    key, sep, values = text.partition("=")
    items = [value.strip() for value in values.split(",") if value.strip()]
    if not sep or key.count(".") != 1 or not items:
        raise SubmitError(f"--sweep {text!r} must look like section.key=v1,v2,... (e.g. optim.lr=0.1,0.2)")
    if len(set(items)) != len(items):
        raise SubmitError(f"--sweep {text!r} repeats a value")
    return key.strip(), items


def sweep_run_dir(base: str | os.PathLike, key: str, value: str) -> Path:
    """One run folder per swept value, inside the base run folder: runs/x/optim.lr=0.1."""
    return Path(base) / f"{key}={re.sub(r'[^A-Za-z0-9._=+-]', '_', value)}"


def writable_by_others(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def check_folder_safe(path: Path) -> None:
    """The folder holds pickles the job executes: nobody but the owner may write into it."""
    if path.exists() and writable_by_others(path):
        raise SubmitError(f"refusing to submit into {path}: it is writable by group or others "
                          f"(mode {stat.filemode(path.stat().st_mode)}); run `chmod go-w {path}` or choose "
                          "another train.run_dir")


def make_private_folder(path: Path) -> None:
    """Create `path` (and parents) without group/other write permission; tighten it if it exists."""
    path.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o022:
        path.chmod(mode & ~0o022)


@contextlib.contextmanager
def restrictive_umask(mask: int = 0o022):
    """Files submitit and sbatch create meanwhile (pickles, job folders) get no group/other write."""
    previous = os.umask(mask)
    os.umask(previous | mask)
    try:
        yield
    finally:
        os.umask(previous)


def sbatch_refusal(err: Exception, stderr: str) -> str:
    """sbatch's own error lines ('sbatch: error: ...') as one line, for a job Slurm refused."""
    text = "\n".join(filter(None, (str(err), stderr)))
    lines = [line.strip() for line in text.splitlines() if "error" in line.lower() and line.strip()]
    if not lines:
        lines = [line.strip() for line in text.splitlines() if line.strip()][:1] or [type(err).__name__]
    return "; ".join(dict.fromkeys(lines))  # without repeats, in order


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkan-dist submit", description="Submit a (multi-node) training job "
                                     "to Slurm through submitit; it checkpoints and requeues itself on "
                                     "preemption and at its time limit.")
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--gpus-per-node", dest="gpus_per_node", type=int, help="0 = CPU with gloo")
    parser.add_argument("--tasks-per-node", dest="tasks_per_node", type=int, help="default: one per GPU, 1 on CPU")
    parser.add_argument("--cpus-per-task", dest="cpus_per_task", type=int)
    parser.add_argument("--partition")
    parser.add_argument("--time", type=int, metavar="MINUTES", help="time limit per job")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--mem", help="memory per node, e.g. 400G")
    parser.add_argument("--exclude", metavar="NODES")
    parser.add_argument("--signal-delay", dest="signal_delay", type=int, metavar="S",
                        help="USR2 this many seconds before the time limit (default 120)")
    parser.add_argument("--sweep", metavar="KEY=V1,V2,...", help="a job array, one run folder per value")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


@dataclass
class Submission:
    configs: list[Config]  # one per array task (one without --sweep)
    folder: Path  # submitit folder: <run_dir>/slurm/%j
    parameters: dict[str, Any]


def prepare(args: argparse.Namespace) -> Submission:
    """Resolve, validate and check everything; creates nothing."""
    overrides = [*args.overrides, *flag_overrides(args)]
    base = load_config(args.config, overrides, check_paths=True)
    base_dir = Path(base.train.run_dir).expanduser().absolute()
    overrides.append(f"train.run_dir={json.dumps(str(base_dir))}")
    if args.sweep:
        key, values = parse_sweep(args.sweep)
        configs = [load_config(args.config, [*overrides, f"{key}={value}",
                                             f"train.run_dir={json.dumps(str(sweep_run_dir(base_dir, key, value)))}"],
                               check_paths=True) for value in values]
    else:
        configs = [load_config(args.config, overrides, check_paths=True)]
    for config in configs:
        for folder in (Path(config.train.run_dir), Path(config.train.run_dir) / "slurm"):
            check_folder_safe(folder)
    check_folder_safe(base_dir / "slurm")
    parameters = sbatch_parameters(base.slurm, job_name=f"rkan-dist-{base_dir.name}",
                                   run_dirs=[Path(config.train.run_dir) for config in configs])
    return Submission(configs, base_dir / "slurm" / "%j", parameters)


def sbatch_script(submission: Submission) -> str:
    """The script submitit will hand to sbatch (for --dry-run; needs no Slurm on this machine)."""
    from submitit.slurm.slurm import _make_sbatch_string

    parameters = dict(submission.parameters)
    if len(submission.configs) > 1:
        parameters["map_count"] = len(submission.configs)
    command = " ".join([task_python(), "-u -m submitit.core._submit", shlex.quote(str(submission.folder))])
    return _make_sbatch_string(command=command, folder=submission.folder, **parameters)


def task_python() -> str:
    """The Python command submitit runs each task with: signal-safe from its first import (rkan_dist.task_start)."""
    return f"{shlex.quote(sys.executable)} -u -m rkan_dist.task_start"


def submit(submission: Submission) -> list[submitit.Job]:
    """Queue the job (or job array) with every folder private; returns submitit's jobs."""
    check_against_cluster(config_slurm(submission))
    with restrictive_umask():
        for config in submission.configs:
            make_private_folder(Path(config.train.run_dir))
        make_private_folder(submission.folder.parent)
        executor = submitit.AutoExecutor(folder=submission.folder, cluster="slurm",
                                         slurm_max_num_timeout=config_slurm(submission).max_num_timeout,
                                         slurm_python=task_python())
        executor.update_parameters(**{f"slurm_{name}": value for name, value in submission.parameters.items()})
        # submitit prints sbatch's stderr itself before raising: keep it, and say it once, in one line.
        sbatch_stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(sbatch_stderr), (
                    executor.batch() if len(submission.configs) > 1 else contextlib.nullcontext()):
                jobs = [executor.submit(TrainingJob(config_to_dict(config))) for config in submission.configs]
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError,
                subprocess.CalledProcessError, OSError) as err:
            raise SubmitError(f"sbatch refused the job: {sbatch_refusal(err, sbatch_stderr.getvalue())}") from None
        for job in jobs:
            make_private_folder(job.paths.folder)
    return jobs


def config_slurm(submission: Submission) -> SlurmConfig:
    return submission.configs[0].slurm


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        submission = prepare(args)
        if args.dry_run:
            print(sbatch_script(submission))
            for config in submission.configs:
                print(f"# run folder: {config.train.run_dir}")
            print(f"# submitit folder: {submission.folder} (dry run: nothing submitted)")
            return 0
        jobs = submit(submission)
    except ConfigError as err:
        print(outcome_of(err, 0, prefix="rkan-dist submit").line, file=sys.stderr)
        return EXIT_USAGE
    for job, config in zip(jobs, submission.configs):
        run_dir = Path(config.train.run_dir)
        print(f"submitted job {job.job_id}")
        print(f"  run folder: {run_dir}")
        print(f"  logs:       {job.paths.stdout} / {job.paths.stderr}")
        print(f"  tensorboard --logdir {run_dir / 'tb'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
