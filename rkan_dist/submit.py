"""`rkan-dist submit`: multi-node training on Slurm through submitit, with checkpoint-and-requeue.

    rkan-dist submit --config CONFIG [--nodes N] [--gpus-per-node G] [--partition P] [--time MIN]
                     [--dry-run] [--grid key=v1,v2,... | --grid GRID.yaml ...] [section.key=value ...]

The submission is checked against the cluster (rkan_dist.slurm_cluster) and pickles a
`TrainingJob` that holds only the resolved config (never model state); inside the job every task
runs rkan_dist.slurm_task, and the batch script ends with rkan_dist.after_srun, which restarts the
job after a failed step. docs/SLURM.md and docs/FAULTS.md say what happens on a preemption, a time
limit and a crash. A grid (rkan_dist.grid) is one job array, one element per run that is not
finished or already queued, at most slurm.array_parallelism of them at once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shlex
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from rkan_dist.after_srun import batch_setup_lines, batch_teardown_lines
from rkan_dist.config import Config, SlurmConfig, config_to_dict, load_config
from rkan_dist.eviction import EvictionPolicy, excluded_by_run
from rkan_dist.faults import EXIT_USAGE, ConfigError, outcome_of
from rkan_dist.grid import TO_RUN, Grid, GridRun, describe, grid_states, load_grid, record_grid
from rkan_dist.ledger import EventLedger
from rkan_dist.nodes import join_nodes, parse_nodelist
from rkan_dist.resume import fit_global_batch
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
    tasks = tasks_per_node(slurm)
    params: dict[str, Any] = {
        "job_name": job_name, "nodes": slurm.nodes, "ntasks_per_node": tasks,
        "cpus_per_task": slurm.cpus_per_task, "time": slurm.time_minutes,
        "signal_delay_s": slurm.signal_delay_s, "additional_parameters": {"requeue": True},
        "srun_args": ["--kill-on-bad-exit=1"], "setup": batch_setup_lines(run_dirs, EvictionPolicy.of(slurm)),
    }
    if slurm.fewest_nodes < slurm.nodes:
        # Run on what Slurm has free, keeping the global batch (slurm.min_nodes). Given
        # --ntasks-per-node, Slurm counts the job's tasks from its fewest nodes and then allocates
        # only that many nodes, however many are idle; so the job asks for one task per node holding
        # all its tasks' CPUs, and srun starts the tasks on every node the job got.
        params["additional_parameters"]["nodes"] = f"{slurm.fewest_nodes}-{slurm.nodes}"  # submitit's `nodes`: a number
        del params["ntasks_per_node"]
        params["cpus_per_task"] = tasks * slurm.cpus_per_task
        params["srun_args"] += [f"--ntasks-per-node={tasks}", f"--cpus-per-task={slurm.cpus_per_task}"]
    if run_dirs:
        params["teardown"] = batch_teardown_lines(run_dirs, slurm.max_num_failures, EvictionPolicy.of(slurm))
    if run_dirs and len(run_dirs) > 1:  # a job array (submitit's batch): --array=0-N%P
        params["array_parallelism"] = slurm.array_parallelism
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


# sbatch passes the submitting shell's environment to every task (--export=ALL). A launcher's variables
# there (a torchrun, or a process group the submitting Python formed) would override the job's own
# rendezvous: every job submitted from that shell would meet on one MASTER_PORT, taken by the first.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def without_launcher_variables():
    """The environment sbatch sees, without LAUNCHER_VARIABLES; restored afterwards."""
    saved = {name: os.environ.pop(name) for name in LAUNCHER_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


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
    parser.add_argument("--config", help="YAML recipe (a grid file may name it instead)")
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
    parser.add_argument("--grid", action="append", metavar="KEY=V1,V2,... | GRID.yaml",
                        help="a grid of runs as one job array (repeat for the cartesian product; see rkan_dist.grid)")
    parser.add_argument("--sweep", dest="grid", action="append", metavar="KEY=V1,V2,...", help="the same as --grid")
    parser.add_argument("--no-exclude-evicted", dest="exclude_evicted", action="store_false",
                        help="let the job run on nodes an earlier job of this run excluded (by default it does not)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and the sbatch script; submit nothing")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    return parser


@dataclass
class Submission:
    configs: list[Config]  # one per array task (one for a plain job; none when a grid has nothing to submit)
    folder: Path  # submitit folder: <run_dir>/slurm/%j (a grid's: <grid folder>/slurm/%j)
    parameters: dict[str, Any]
    grid: Grid | None = None
    states: dict[str, str] | None = None  # a grid's runs: name -> finished | queued | ... (rkan_dist.grid)
    evicted: list[str] = field(default_factory=list)  # nodes earlier jobs of these runs excluded, excluded again


def prepare(args: argparse.Namespace) -> Submission:
    """Resolve, validate and check everything (every run of a grid); creates nothing."""
    overrides = [*args.overrides, *flag_overrides(args)]
    grid = states = None
    if args.grid:
        grid = load_grid(args.config, args.grid, overrides)
        states = grid_states(grid)
        base, base_dir = grid.base, grid.folder
        configs = [run.config for run in grid.runs if states[run.name] in TO_RUN]
    else:
        if args.config is None:
            raise ConfigError("--config CONFIG is required (or --grid with a grid file that names one)")
        base = load_config(args.config, overrides, check_paths=True)
        base_dir = Path(base.train.run_dir).expanduser().absolute()
        configs = [load_config(args.config, [*overrides, f"train.run_dir={json.dumps(str(base_dir))}"],
                               check_paths=True)]
    for config in configs:
        for folder in (Path(config.train.run_dir), Path(config.train.run_dir) / "slurm"):
            check_folder_safe(folder)
    check_folder_safe(base_dir / "slurm")
    for config in configs:
        check_shrink(config)
    parameters = sbatch_parameters(base.slurm, job_name=f"rkan-dist-{base_dir.name}",
                                   run_dirs=[Path(config.train.run_dir) for config in configs])
    evicted = evicted_nodes(configs) if args.exclude_evicted else []
    if evicted:
        parameters["exclude"] = join_nodes([*evicted, *(parse_nodelist(base.slurm.exclude) if base.slurm.exclude else [])])
    return Submission(configs, base_dir / "slurm" / "%j", parameters, grid, states, evicted)


def check_shrink(config: Config) -> None:
    """slurm.min_nodes < slurm.nodes: every node count in between must keep the global batch, and the
    optimizer state must be loadable on fewer processes (ZeRO partitions it per process)."""
    slurm = config.slurm
    if slurm.fewest_nodes == slurm.nodes:
        return
    if config.parallel.backend == "deepspeed" and config.parallel.zero_stage >= 1:
        raise SubmitError(f"slurm.min_nodes={slurm.min_nodes} < slurm.nodes={slurm.nodes} needs a resumable world "
                          f"size, but DeepSpeed ZeRO-{config.parallel.zero_stage} partitions the optimizer state per "
                          "process: use parallel.zero_stage=0 or parallel.backend=ddp, or slurm.min_nodes=0")
    tasks = tasks_per_node(slurm)
    global_batch = config.data.batch_size * config.train.grad_accum * slurm.nodes * tasks
    unfit = []
    for nodes in range(slurm.fewest_nodes, slurm.nodes):
        try:
            fit_global_batch(global_batch, nodes * tasks, config.data.batch_size, config.train.grad_accum)
        except ValueError:
            unfit.append(nodes)
    if unfit:
        raise SubmitError(f"slurm.min_nodes={slurm.min_nodes}: the global batch of {global_batch} (data.batch_size "
                          f"{config.data.batch_size} x train.grad_accum {config.train.grad_accum} x {slurm.nodes} "
                          f"nodes x {tasks} task(s)) cannot be split evenly on {' or '.join(map(str, unfit))} "
                          f"node(s); choose a batch size or slurm.min_nodes that divides it")


def evicted_nodes(configs: list[Config]) -> list[str]:
    """The nodes earlier jobs of these runs excluded (rkan_dist.eviction): a resubmission avoids them too."""
    nodes: set[str] = set()
    for config in configs:
        with contextlib.suppress(OSError, ValueError):
            nodes.update(excluded_by_run(EventLedger(config.train.run_dir).read()["events"]))
    return sorted(nodes)


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
        runs = grid_runs(submission)
        if submission.grid is not None:  # each run folder says which run of which grid it is, before it starts
            record_grid(submission.grid, runs)
        executor = submitit.AutoExecutor(folder=submission.folder, cluster="slurm",
                                         slurm_max_num_timeout=config_slurm(submission).max_num_timeout,
                                         slurm_python=task_python())
        executor.update_parameters(**{f"slurm_{name}": value for name, value in submission.parameters.items()})
        # submitit prints sbatch's stderr itself before raising: keep it, and say it once, in one line.
        sbatch_stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(sbatch_stderr), without_launcher_variables(), (
                    executor.batch() if len(submission.configs) > 1 else contextlib.nullcontext()):
                jobs = [executor.submit(TrainingJob(config_to_dict(config))) for config in submission.configs]
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError,
                subprocess.CalledProcessError, OSError) as err:
            raise SubmitError(f"sbatch refused the job: {sbatch_refusal(err, sbatch_stderr.getvalue())}") from None
        for job in jobs:
            make_private_folder(job.paths.folder)
        if submission.grid is not None:  # what a re-run asks Slurm about
            record_grid(submission.grid, [], {run.name: str(job.job_id) for run, job in zip(runs, jobs)})
    return jobs


def grid_runs(submission: Submission) -> list[GridRun]:
    """The grid runs of `submission.configs`, in the same order (the job array's)."""
    if submission.grid is None:
        return []
    by_folder = {run.run_dir: run for run in submission.grid.runs}
    return [by_folder[Path(config.train.run_dir)] for config in submission.configs]


def config_slurm(submission: Submission) -> SlurmConfig:
    return submission.configs[0].slurm


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        submission = prepare(args)
        if submission.grid is not None:
            print(describe(submission.grid, submission.states), flush=True)
            if not submission.configs:
                print("nothing to submit: every run is finished or queued")
                return 0
        if submission.evicted:
            print(f"excluding {join_nodes(submission.evicted)}: earlier jobs of this run excluded them as bad nodes "
                  "(--no-exclude-evicted to allow them)", flush=True)
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
