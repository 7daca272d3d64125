"""Grids: one recipe, many runs (an ablation table), each an ordinary run folder.

    rkan-dist submit --config C --grid model.aggregation=addition,gating --grid train.seed=0,1,2 [overrides]
    rkan-dist submit --grid configs/ablations/demo.yaml [--grid train.seed=0,1,2,3] [overrides]
    rkan-dist train  --grid ... [--nproc N]        the same runs on this machine, one after another
    ... --dry-run                                   the runs and their state (submit: and the sbatch script)

A grid is a recipe, the overrides every run shares (the grid file's `overrides`, then the command
line's), and its runs: the grid file's `runs` (one empty run if it lists none) crossed with the
cartesian product of its axes (the file's `grid`, then each `--grid KEY=V1,V2`; a command-line
axis replaces the file's axis of the same key). A grid file:

    config: ../imagenet/rkan_resnet50_16ep.yaml      # relative to the file; --config replaces it
    overrides: {train.run_dir: runs/ablations/aggregation}
    grid: {model.aggregation: [addition, gating, se], train.seed: [0, 1, 2]}
    runs: [{model.rkan_stages: [4]}, {model.rkan_stages: [3, 4]}]

Every run is resolved and validated before anything starts: an unknown key names the valid ones,
a value that fails validation fails the whole grid, and two runs that resolve to the same folder
are refused. A run's folder is `<train.run_dir>/<key=value,...>`, its overrides' resolved values
with the keys sorted (so `optim.lr=0.1` and `optim.lr=0.10` are one run). The grid's folder holds
`grid.json` (its runs and the Slurm jobs submitted for them); each run folder gets `run.json` (its
name and overrides), which its summary.json repeats for `rkan-dist compare`.

Running the same command again skips the runs whose summary says finished, leaves alone those whose
Slurm job is queued or running, and starts the others, which continue from their latest checkpoint
(train.resume=auto). Slurm resources (`slurm.*`) cannot vary inside a grid: its runs are the
elements of one job array, which share one sbatch request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rkan_dist.config import Config, _suggest, load_config, valid_keys
from rkan_dist.faults import EXIT_FAULT, EXIT_INTERRUPTED, ConfigError
from rkan_dist.ledger import EventLedger
from rkan_dist.run_summary import RUN_NAME, ledger_state, read_summary

GRID_NAME = "grid.json"
SEED_KEY = "train.seed"
FILE_KEYS = ("config", "overrides", "grid", "runs")
# Slurm job states after which the job may still run (a requeued job passes through several).
ACTIVE_JOB_STATES = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                               "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"})
# What a re-run does with a run in each state.
TO_RUN = ("new", "unfinished", "failed")


@dataclass(frozen=True)
class GridRun:
    name: str  # the folder name, from the resolved overrides
    overrides: dict[str, Any]  # key -> resolved value, keys sorted
    texts: tuple[str, ...]  # the overrides as given, key=value (for a command line)
    config: Config  # resolved, train.run_dir = <grid folder>/<name>

    @property
    def run_dir(self) -> Path:
        return Path(self.config.train.run_dir)


@dataclass(frozen=True)
class Grid:
    config_path: str
    overrides: tuple[str, ...]  # every run's, key=value
    folder: Path
    base: Config  # the recipe with the shared overrides (its slurm section is the array's request)
    runs: tuple[GridRun, ...]
    keys: tuple[str, ...]  # the keys that vary, in the order given


# ------------------------------------------------------------------------------------ parsing
def split_values(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']; commas inside brackets stay: '[4],[3,4]' -> ['[4]', '[3,4]']."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_axis(text: str) -> tuple[str, list[str]]:
    """'--grid optim.lr=0.1,0.2' -> ('optim.lr', ['0.1', '0.2']): values stay text, as in an override."""
    key, sep, rest = text.partition("=")
    key = key.strip()
    values = split_values(rest) if sep else []
    if not sep or key.count(".") != 1 or not values or not all(values):
        raise ConfigError(f"--grid {text!r} must look like section.key=v1,v2,... (e.g. train.seed=0,1,2) "
                          "or name a grid file (.yaml)")
    if len(set(values)) != len(values):
        raise ConfigError(f"--grid {text!r} repeats a value")
    return key, values


def override_text(key: str, value: Any) -> str:
    """A value from a grid file as an override (JSON is YAML, so load_config reads it back as it was)."""
    return f"{key}={json.dumps(value)}"


def read_grid_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"grid file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse the grid file {path}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict) or set(data) - set(FILE_KEYS):
        extra = sorted(set(data) - set(FILE_KEYS)) if isinstance(data, dict) else [type(data).__name__]
        raise ConfigError(f"grid file {path}: unknown entry {', '.join(map(str, extra))}; "
                          f"a grid file has {', '.join(FILE_KEYS)}")
    if not isinstance(data.get("overrides", {}), dict) or not isinstance(data.get("grid", {}), dict):
        raise ConfigError(f"grid file {path}: 'overrides' and 'grid' are mappings of section.key")
    for key, values in data.get("grid", {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid file {path}: grid.{key} must be a non-empty list of values")
    runs = data.get("runs", [])
    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        raise ConfigError(f"grid file {path}: 'runs' is a list of mappings of section.key to a value")
    if data.get("config") is not None:
        data["config"] = str((path.parent / str(data["config"])).resolve())
    return data


def grid_spec(items: Iterable[str]) -> tuple[str | None, list[str], list[dict[str, str]], dict[str, list[str]]]:
    """The --grid arguments -> (the file's recipe, shared overrides, listed runs, axes); every value as
    override text (key=value)."""
    config, overrides, runs, axes = None, [], [], {}
    for item in items:
        if "=" not in item and (item.endswith((".yaml", ".yml")) or Path(item).is_file()):  # a grid file
            data = read_grid_file(Path(item))
            if config is not None and data.get("config") not in (None, config):
                raise ConfigError(f"grid files name two recipes: {config} and {data['config']}")
            config = data.get("config") or config
            overrides += [override_text(key, value) for key, value in data.get("overrides", {}).items()]
            runs += [{key: override_text(key, value) for key, value in run.items()} for run in data.get("runs", [])]
            for key, values in data.get("grid", {}).items():
                axes[key] = [override_text(key, value) for value in values]
        else:
            key, values = parse_axis(item)
            axes[key] = [f"{key}={value}" for value in values]  # replaces a file's axis of the same key
    return config, overrides, runs, axes


def check_grid_key(key: str) -> None:
    if key not in valid_keys():
        hint = _suggest(key)
        section = key.split(".")[0]
        fields = [known.split(".", 1)[1] for known in valid_keys() if known.startswith(section + ".")]
        if fields and "valid keys" not in hint and "its keys are" not in hint:
            hint += f" (valid keys in '{section}': {', '.join(fields)})"
        raise ConfigError(f"grid key '{key}' is not a config key{hint}")
    if key == "train.run_dir":
        raise ConfigError("train.run_dir cannot vary in a grid: each run gets the folder its overrides name, "
                          "inside the grid's train.run_dir")
    if key.startswith("slurm."):
        raise ConfigError(f"{key} cannot vary in a grid: its runs are one job array and share one sbatch "
                          f"request; set it for the whole grid ({key}=...)")


# ------------------------------------------------------------------------------------ expansion
def value_text(value: Any) -> str:
    """A resolved value as part of a folder name: 0.1, true, 3+4 (a list), addition."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "+".join(value_text(item) for item in value) or "none"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", str(value))


def run_name(overrides: dict[str, Any]) -> str:
    return ",".join(f"{key}={value_text(value)}" for key, value in overrides.items()) or "defaults"


def resolved_value(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def load_grid(config_path: str | None, items: list[str], overrides: list[str]) -> Grid:
    """Expand and validate the grid of `items` (--grid arguments) on a recipe; runs nothing."""
    file_config, file_overrides, listed, axes = grid_spec(items)
    if config_path is not None and file_config is not None and Path(config_path).resolve() != Path(file_config):
        raise ConfigError(f"--config {config_path} and the grid file's config {file_config} differ; give one")
    config_path = str(Path(config_path).resolve()) if config_path is not None else file_config
    if config_path is None:
        raise ConfigError("a grid needs a recipe: --config CONFIG, or a grid file with config:")
    shared = [*file_overrides, *overrides]
    base = load_config(config_path, shared, check_paths=True)
    folder = Path(base.train.run_dir).expanduser().absolute()
    keys = list(dict.fromkeys([*(key for run in listed for key in run), *axes]))
    for key in keys:
        check_grid_key(key)
    runs: list[GridRun] = []
    for entry in listed or [{}]:
        both = sorted(set(entry) & set(axes))
        if both:
            raise ConfigError(f"{', '.join(both)} is set both by a listed run and by a grid axis; give it in one place")
        for combination in itertools.product(*axes.values()):
            texts = (*entry.values(), *combination)
            try:
                config = load_config(config_path, [*shared, *texts], check_paths=True)
            except ConfigError as err:
                raise ConfigError(f"grid run {','.join(texts) or 'defaults'}: {err}") from None
            resolved = {key: resolved_value(config, key) for key in sorted(key for key in keys
                                                                            if key in {*entry, *axes})}
            name = run_name(resolved)
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, run_dir=str(folder / name)))
            runs.append(GridRun(name, resolved, texts, config))
    seen: dict[str, GridRun] = {}
    for run in runs:
        if run.name in seen:
            raise ConfigError(f"grid runs {','.join(seen[run.name].texts)} and {','.join(run.texts)} resolve to the "
                              f"same run folder {folder / run.name}")
        seen[run.name] = run
    return Grid(config_path, tuple(shared), folder, base, tuple(runs), tuple(keys))


# ------------------------------------------------------------------------------------ state
def read_grid_record(folder: Path) -> dict[str, Any]:
    with contextlib.suppress(FileNotFoundError):
        return json.loads((folder / GRID_NAME).read_text())
    return {}


def job_is_active(job_id: str) -> bool:
    from rkan_dist.slurm_cluster import slurm_state

    state = slurm_state(job_id)
    return state is not None and state.split()[0].rstrip("+") in ACTIVE_JOB_STATES


def run_jobs(run: GridRun, recorded: dict[str, str]) -> list[str]:
    """The Slurm jobs that may be training `run`: the one the grid submitted last, the one its ledger
    last started under (a run submitted on its own)."""
    jobs = [recorded[run.name]] if run.name in recorded else []
    with contextlib.suppress(OSError, ValueError):
        starts = [event for event in EventLedger(run.run_dir).read()["events"] if event.get("event") == "start"]
        if starts and starts[-1].get("job_id"):
            jobs.append(str(starts[-1]["job_id"]))
    return list(dict.fromkeys(jobs))


def run_state(run: GridRun, recorded_jobs: dict[str, str]) -> str:
    """finished | queued (its Slurm job is pending or running) | failed | unfinished | new."""
    summary = read_summary(run.run_dir)
    if summary is not None and summary.get("status") == "finished":
        return "finished"
    if any(job_is_active(job) for job in run_jobs(run, recorded_jobs)):
        return "queued"
    return {"failed": "failed", "started": "unfinished", None: "new"}[ledger_state(run.run_dir)]


def grid_states(grid: Grid) -> dict[str, str]:
    recorded = read_grid_record(grid.folder).get("jobs", {})
    return {run.name: run_state(run, recorded) for run in grid.runs}


def describe(grid: Grid, states: dict[str, str]) -> str:
    counts = ", ".join(f"{sum(state == name for state in states.values())} {name}"
                       for name in ("finished", "queued", "unfinished", "failed", "new")
                       if name in states.values())
    axes = " x ".join(grid.keys) or "no keys"
    lines = [f"grid {grid.folder}: {len(grid.runs)} runs ({axes}): {counts}"]
    lines += [f"  {states[run.name]:<10} {run.name}" for run in grid.runs]
    return "\n".join(lines)


def record_grid(grid: Grid, runs: Iterable[GridRun], jobs: dict[str, str] | None = None) -> None:
    """grid.json in the grid's folder (its runs, and the jobs last submitted for them), and run.json in
    each of `runs`' folders (which must exist)."""
    record = read_grid_record(grid.folder)
    record.update({"config": grid.config_path, "overrides": list(grid.overrides), "keys": list(grid.keys),
                   "runs": [{"name": run.name, "overrides": run.overrides} for run in grid.runs],
                   "jobs": {**record.get("jobs", {}), **(jobs or {})}})
    _write_json(grid.folder / GRID_NAME, record)
    for run in runs:
        _write_json(run.run_dir / RUN_NAME, {"grid": str(grid.folder), "name": run.name, "overrides": run.overrides})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ local runs
def train_grid(config_path: str | None, items: list[str], overrides: list[str], nproc: int = 1,
               dry_run: bool = False) -> int:
    """`rkan-dist train --grid ...`: the grid's runs here, one after another, each as its own
    `rkan-dist train` process (a crash ends that run, not the grid). Ctrl-C stops the run in
    progress at a step boundary with a checkpoint, and the grid with it."""
    grid = load_grid(config_path, items, overrides)
    states = grid_states(grid)
    print(describe(grid, states), flush=True)
    todo = [run for run in grid.runs if states[run.name] in TO_RUN]
    if dry_run:
        print(f"# dry run: {len(todo)} of {len(grid.runs)} runs would train here, one after another")
        return 0
    queued = [run.name for run in grid.runs if states[run.name] == "queued"]
    if queued:
        print(f"# left alone, their Slurm jobs are queued or running: {', '.join(queued)}")
    record_grid(grid, todo)
    failed = []
    for number, run in enumerate(todo, 1):
        print(f"# grid run {number} of {len(todo)}: {run.name}", flush=True)
        code = _train_one(grid, run, nproc)
        if code == EXIT_INTERRUPTED or code < 0:
            print(f"grid stopped during {run.name} (exit {code}); re-run the same command to continue", flush=True)
            return EXIT_INTERRUPTED
        if code != 0:
            failed.append(f"{run.name} (exit {code})")
    if failed:
        print(f"grid {grid.folder}: {len(failed)} of {len(todo)} runs failed: {'; '.join(failed)}; re-run the same "
              "command to continue them", flush=True)
        return EXIT_FAULT
    print(f"grid {grid.folder}: all {len(grid.runs)} runs finished; rkan-dist compare {grid.folder}", flush=True)
    return 0


def _train_one(grid: Grid, run: GridRun, nproc: int) -> int:
    command = [sys.executable, "-m", "rkan_dist.cli", "train", "--config", grid.config_path, "--nproc", str(nproc),
               *grid.overrides, *run.texts, f"train.run_dir={json.dumps(str(run.run_dir))}"]
    child = subprocess.Popen(command)
    # The terminal's Ctrl-C reaches the run itself (one process group), which stops at a step
    # boundary with a checkpoint: this process only waits for it. A SIGTERM sent to this process
    # alone is passed on, so the run stops the same way.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: None),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda signum, _: child.send_signal(signum))}
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
