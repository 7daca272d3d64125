"""A 2x2 grid (aggregation x seed) on the digits data, trained here with `rkan-dist train --grid`:
every run finishes with its summary, a re-run trains nothing, an unfinished run is continued from
its checkpoint, `compare` gives the groups, means and n of the summaries, TensorBoard's own reader
lists each run once in the HParams plugin, and `--plot` draws a real image."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from trainrun import REPO
from trainrun import test_env as run_env  # not collected as a test

from rkan_dist.run_summary import SUMMARY_NAME

pytestmark = pytest.mark.timeout(900)

DEMO = REPO / "configs" / "demo.yaml"
STEPS = 3
GRID = ["--grid", "model.aggregation=addition,gating", "--grid", "train.seed=0,1"]
RUNS = [f"model.aggregation={aggregation},train.seed={seed}" for aggregation in ("addition", "gating")
        for seed in (0, 1)]


def grid_command(folder: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "rkan_dist.cli", "train", "--config", str(DEMO), *GRID,
            f"train.run_dir={folder}", f"data.cache_dir={cache}", f"train.max_steps={STEPS}",
            "checkpoint.every_steps=2", "data.batch_size=16", "data.val_batch_size=360", "data.num_workers=1",
            "logging.every_steps=1", "logging.progress_bar=false", "logging.histograms_every=0",
            "logging.image_grid=false", "train.precision=fp32"]


def run_grid(folder: Path, cache: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(grid_command(folder, cache), capture_output=True, text=True, timeout=800, cwd=REPO,
                            env=run_env())
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def starts(run_dir: Path) -> list[dict]:
    return [event for event in json.loads((run_dir / "events.json").read_text())["events"]
            if event["event"] == "start"]


@pytest.fixture(scope="module")
def grid_folder(tmp_path_factory, digits_cache) -> Path:
    folder = tmp_path_factory.mktemp("grid") / "demo"
    result = run_grid(folder, digits_cache)
    assert "4 runs (model.aggregation x train.seed): 4 new" in result.stdout
    assert f"grid {folder}: all 4 runs finished" in result.stdout
    return folder


def test_every_run_has_its_folder_and_a_finished_summary(grid_folder: Path) -> None:
    record = json.loads((grid_folder / "grid.json").read_text())
    assert [run["name"] for run in record["runs"]] == RUNS
    for name in RUNS:
        run_dir = grid_folder / name
        summary = json.loads((run_dir / SUMMARY_NAME).read_text())
        aggregation, seed = name.split(",")
        assert summary["status"] == "finished" and summary["steps"] == STEPS == summary["total_steps"]
        assert summary["overrides"] == {"model.aggregation": aggregation.split("=")[1], "train.seed": int(seed[-1])}
        assert summary["config"]["model"]["aggregation"] == aggregation.split("=")[1]
        assert summary["model"] == "rkan_resnet18" and summary["params"] > 11_000_000 and summary["flops"] > 1e8
        evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                 if '"kind": "eval"' in line]
        assert summary["top1"] == evals[-1]["eval/top1"] and summary["top5"] == evals[-1]["eval/top5"]
        assert summary["images_per_s"] > 0 and 0 < summary["train_seconds"] <= summary["wall_seconds"]
        assert summary["device_hours_unit"] == "CPU-hours" and summary["device_hours"] > 0
        assert (summary["failures"], summary["restarts"]) == (0, 0)
        assert summary["versions"]["torch"] and "git_commit" in summary
    gating = json.loads((grid_folder / RUNS[2] / SUMMARY_NAME).read_text())
    addition = json.loads((grid_folder / RUNS[0] / SUMMARY_NAME).read_text())
    assert gating["params"] > addition["params"]  # the gate's own weights


def test_re_running_trains_nothing_and_an_unfinished_run_continues(grid_folder: Path, digits_cache) -> None:
    before = {name: len(starts(grid_folder / name)) for name in RUNS}
    result = run_grid(grid_folder, digits_cache)
    assert "4 runs (model.aggregation x train.seed): 4 finished" in result.stdout
    assert "# grid run" not in result.stdout
    assert {name: len(starts(grid_folder / name)) for name in RUNS} == before
    # One run as a crash after its step-2 checkpoint leaves it: no summary, no last checkpoint.
    run_dir = grid_folder / RUNS[3]
    summary = json.loads((run_dir / SUMMARY_NAME).read_text())
    (run_dir / SUMMARY_NAME).unlink()
    shutil.rmtree(run_dir / "checkpoints" / f"step-{STEPS}")
    result = run_grid(grid_folder, digits_cache)
    assert "3 finished, 1 unfinished" in result.stdout and "# grid run 1 of 1: " + RUNS[3] in result.stdout
    assert starts(run_dir)[-1]["step"] == 2  # continued from its checkpoint, not from scratch
    assert {name: len(starts(grid_folder / name)) for name in RUNS[:3]} == {name: before[name] for name in RUNS[:3]}
    again = json.loads((run_dir / SUMMARY_NAME).read_text())
    assert again["status"] == "finished" and again["top1"] == summary["top1"]  # exact resume, same result


def test_compare_gives_the_groups_means_and_n(grid_folder: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "rkan_dist.cli", "compare", str(grid_folder), "--format", "json",
                             "--baseline", "model.aggregation=addition"], capture_output=True, text=True, timeout=120,
                            check=True)
    data = json.loads(result.stdout)
    top1 = {name: json.loads((grid_folder / name / SUMMARY_NAME).read_text())["top1"] for name in RUNS}
    groups = {group["model.aggregation"]: group for group in data["groups"]}
    assert set(groups) == {"addition", "gating"} and data["keys"] == ["model.aggregation"]
    for aggregation, (first, second) in (("addition", RUNS[:2]), ("gating", RUNS[2:])):
        assert groups[aggregation]["n"] == 2
        assert groups[aggregation]["top1_mean"] == pytest.approx(50 * (top1[first] + top1[second]))
    assert groups["gating"]["delta_top1"] == pytest.approx(groups["gating"]["top1_mean"] - groups["addition"]["top1_mean"])
    assert data["not_included"] == [] and data["interval"] == "95% Welch's t"
    table = subprocess.run([sys.executable, "-m", "rkan_dist.cli", "compare", str(grid_folder)], capture_output=True,
                           text=True, timeout=120, check=True).stdout
    print(table)
    assert "| model.aggregation | n |" in table and "| addition | 2 |" in table and "| gating | 2 |" in table


def test_tensorboard_lists_each_run_once_in_hparams(grid_folder: Path) -> None:
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import metadata

    multiplexer = EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(grid_folder))
    multiplexer.Reload()
    sessions = {run: tags for run, tags in multiplexer.PluginRunToTagToContent(metadata.PLUGIN_NAME).items()
                if metadata.SESSION_START_INFO_TAG in tags}
    assert sorted(sessions) == sorted(f"{name}/tb" for name in RUNS)  # no timestamped second run per folder
    for run, tags in sessions.items():
        start = metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG])
        aggregation, seed = run.removesuffix("/tb").split(",")
        assert start.hparams["model.aggregation"].string_value == aggregation.split("=")[1]
        assert start.hparams["train.seed"].number_value == int(seed.split("=")[1])
        assert metadata.SESSION_END_INFO_TAG in tags
        assert "eval/top1" in multiplexer.PluginRunToTagToContent("scalars")[run]  # the metric beside its hparams


def test_plot_is_a_real_image(grid_folder: Path, tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "top1.png"
    subprocess.run([sys.executable, "-m", "rkan_dist.cli", "compare", str(grid_folder), "--plot", str(png)],
                   capture_output=True, text=True, timeout=120, check=True)
    image = Image.open(png).convert("RGB")
    assert image.size[0] >= 600 and image.size[1] >= 400
    assert len(image.getcolors(maxcolors=1 << 20)) > 50  # axes, text, two colored points with error bars
