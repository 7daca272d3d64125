"""Grids without training: expansion, folder names, the grid file, the bad inputs (one line, exit 2),
the --sweep alias, the ablation recipes, and compare's grouping and Welch interval on written
summaries. Real runs of a grid: tests/integration/test_grid_local.py and tests/slurm/test_grid_array.py."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest

from rkan_dist import cli, compare, grid, submit
from rkan_dist.config import load_config
from rkan_dist.faults import ConfigError

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO = str(REPO_ROOT / "configs" / "demo.yaml")
ABLATIONS = REPO_ROOT / "configs" / "ablations"


def test_axes_make_the_cartesian_product_with_folders_named_by_resolved_overrides(tmp_path: Path) -> None:
    g = grid.load_grid(DEMO, ["model.aggregation=addition,gating", "train.seed=0,1,2"], [f"train.run_dir={tmp_path}"])
    assert [run.name for run in g.runs] == [f"model.aggregation={aggregation},train.seed={seed}"
                                            for aggregation in ("addition", "gating") for seed in (0, 1, 2)]
    assert g.folder == tmp_path and g.keys == ("model.aggregation", "train.seed")
    run = g.runs[4]
    assert run.run_dir == tmp_path / "model.aggregation=gating,train.seed=1"
    assert (run.config.model.aggregation, run.config.train.seed) == ("gating", 1)
    assert run.overrides == {"model.aggregation": "gating", "train.seed": 1}
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # expanding creates nothing


def test_list_values_keep_their_commas_and_name_folders_readably(tmp_path: Path) -> None:
    g = grid.load_grid(DEMO, ["model.rkan_stages=[4],[3,4]", "optim.lr=1e-3,0.2"], [f"train.run_dir={tmp_path}"])
    assert [run.config.model.rkan_stages for run in g.runs][::2] == [[4], [3, 4]]
    assert [run.name for run in g.runs] == ["model.rkan_stages=4,optim.lr=0.001", "model.rkan_stages=4,optim.lr=0.2",
                                            "model.rkan_stages=3+4,optim.lr=0.001", "model.rkan_stages=3+4,optim.lr=0.2"]


def test_a_grid_file_lists_runs_crossed_with_its_axes_and_the_command_line_replaces_an_axis(tmp_path: Path) -> None:
    path = tmp_path / "recipes" / "ablation.yaml"
    path.parent.mkdir()
    path.write_text(f"config: {os.path.relpath(DEMO, path.parent)}\n"  # relative to the grid file
                    f"overrides: {{train.run_dir: {tmp_path / 'grid'}, train.max_steps: 7}}\n"
                    "runs:\n  - {model.reduce_factor: 2}\n  - {model.inverse_bottleneck: true, model.inv_factor: 2}\n"
                    "grid:\n  train.seed: [0, 1]\n")
    g = grid.load_grid(None, [str(path)], [])
    assert g.config_path == DEMO and len(g.runs) == 4 and g.folder == tmp_path / "grid"
    assert all(run.config.train.max_steps == 7 for run in g.runs)
    assert g.runs[2].name == "model.inv_factor=2,model.inverse_bottleneck=true,train.seed=0"
    three_seeds = grid.load_grid(None, [str(path), "train.seed=5,6,7"], ["train.max_steps=9"])
    assert len(three_seeds.runs) == 6 and {run.config.train.seed for run in three_seeds.runs} == {5, 6, 7}
    assert all(run.config.train.max_steps == 9 for run in three_seeds.runs)  # the command line's overrides win


@pytest.mark.parametrize(("items", "message"), [
    (["model.aggregtion=addition,gating"], "grid key 'model.aggregtion' is not a config key; did you mean "
                                           "'model.aggregation'?"),
    (["model.qqq=1,2"], "grid key 'model.qqq' is not a config key; did you mean 'model.name'? (valid keys in "
                        "'model': name, num_classes,"),
    (["qqq.degree=1,2"], "grid key 'qqq.degree' is not a config key; did you mean 'model.degree'?"),
    (["model.degree=3,12"], "grid run model.degree=12: model.degree must be in 0..8, got 12"),
    (["model.aggregation=addition,glue"], "grid run model.aggregation=glue: model.aggregation='glue' is not valid"),
    (["optim.lr=0.1,0.10"], "grid runs optim.lr=0.1 and optim.lr=0.10 resolve to the same run folder"),
    (["train.seed=0,0"], "repeats a value"),
    (["train.seed"], "must look like section.key=v1,v2"),
    (["slurm.nodes=1,2"], "slurm.nodes cannot vary in a grid"),
    (["train.run_dir=a,b"], "train.run_dir cannot vary in a grid"),
    (["/no/such/grid.yaml"], "grid file not found: /no/such/grid.yaml"),
])
def test_bad_grids_are_one_line_and_exit_2_before_anything_runs(capsys, tmp_path: Path, items, message) -> None:
    flags = [arg for item in items for arg in ("--grid", item)]
    for main in (lambda: cli.main(["train", "--config", DEMO, *flags, "--dry-run", f"train.run_dir={tmp_path}"]),
                 lambda: submit.main(["--config", DEMO, *flags, "--dry-run", f"train.run_dir={tmp_path}"])):
        assert main() == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not any(tmp_path.iterdir())


def test_a_value_failing_validation_fails_the_whole_grid_and_submits_nothing(capsys, tmp_path: Path) -> None:
    # the bad value is the last of many: no run of the grid is queued, nor any folder made
    code = submit.main(["--config", DEMO, "--grid", "train.seed=0,1,2", "--grid", "model.degree=2,3,9",
                        f"train.run_dir={tmp_path / 'g'}"])
    assert code == 2 and "model.degree must be in 0..8, got 9" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_a_grid_file_with_an_unknown_entry_names_the_valid_ones(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text("axes: {train.seed: [0]}\n")
    with pytest.raises(ConfigError, match="unknown entry axes; a grid file has config, overrides, grid, runs"):
        grid.load_grid(DEMO, [str(path)], [])


def test_submit_dry_run_is_one_array_capped_by_array_parallelism(capsys, tmp_path: Path) -> None:
    code = submit.main(["--config", DEMO, "--dry-run", "--grid", "model.aggregation=addition,gating,se",
                        "--grid", "train.seed=0,1", "slurm.array_parallelism=4", f"train.run_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0 and "#SBATCH --array=0-5%4" in out
    assert f"grid {tmp_path}: 6 runs (model.aggregation x train.seed): 6 new" in out
    teardown = next(line for line in out.splitlines() if "rkan_dist.after_srun" in line)
    assert teardown.count("--run-dir") == 6 and f"--run-dir {tmp_path}/model.aggregation=se,train.seed=1" in teardown
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_sweep_is_an_alias_of_a_one_key_grid(capsys, tmp_path: Path) -> None:
    code = submit.main(["--config", DEMO, "--dry-run", "--sweep", "optim.lr=0.1,0.4,0.8", f"train.run_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0 and "#SBATCH --array=0-2%3" in out
    for value in ("0.1", "0.4", "0.8"):
        assert f"run folder: {tmp_path / f'optim.lr={value}'}" in out


def test_finished_runs_are_skipped_and_nothing_left_is_nothing_submitted(capsys, tmp_path: Path) -> None:
    items = ["train.seed=0,1"]
    g = grid.load_grid(DEMO, items, [f"train.run_dir={tmp_path}"])
    for run in g.runs:
        run.run_dir.mkdir(parents=True)
    (g.runs[0].run_dir / "summary.json").write_text(json.dumps({"status": "finished"}))
    (g.runs[1].run_dir / "events.json").write_text(json.dumps({"events": [{"time": 1, "event": "start"}]}))
    assert grid.grid_states(g) == {"train.seed=0": "finished", "train.seed=1": "unfinished"}
    code = submit.main(["--config", DEMO, "--dry-run", "--grid", *items, f"train.run_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0 and "--run-dir" in out and f"--run-dir {g.runs[0].run_dir}" not in out
    (g.runs[1].run_dir / "summary.json").write_text(json.dumps({"status": "finished"}))
    code = submit.main(["--config", DEMO, "--grid", *items, f"train.run_dir={tmp_path}"])  # not a dry run
    assert code == 0 and "nothing to submit: every run is finished or queued" in capsys.readouterr().out


@pytest.mark.parametrize(("name", "runs", "keys"), [
    ("aggregation.yaml", 39, ("model.aggregation", "train.seed")),
    ("degree.yaml", 15, ("model.degree", "train.seed")),
    ("reduce_factor.yaml", 21, ("model.reduce_factor", "model.inverse_bottleneck", "model.inv_factor", "train.seed")),
    ("stages.yaml", 18, ("model.name", "model.rkan_stages", "train.seed")),
    ("demo.yaml", 9, ("model.aggregation", "train.seed")),
])
def test_the_ablation_recipes_expand_and_validate(name: str, runs: int | None, keys: tuple[str, ...]) -> None:
    # the ImageNet files are not here: the embedded data stands in, which leaves every other check on
    g = grid.load_grid(None, [str(ABLATIONS / name)], ["data.dataset=digits"])
    assert g.keys == keys and (runs is None or len(g.runs) == runs)
    assert len({run.name for run in g.runs}) == len(g.runs)
    assert g.folder.name == name.removesuffix(".yaml")


# ---------------------------------------------------------------------------------------- compare
def write_run(folder: Path, overrides: dict, top1: float | None, status: str = "finished", **extra) -> Path:
    config = load_config(DEMO, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])
    from rkan_dist.config import config_to_dict

    folder.mkdir(parents=True)
    summary = {"status": status, "name": folder.name, "overrides": overrides, "model": config.model.name,
               "top1": top1, "top5": None if top1 is None else min(1.0, top1 + 0.05), "params": 1_000_000,
               "flops": 2e9, "images_per_s": 100.0, "device_hours": 0.5, "device_hours_unit": "CPU-hours",
               "steps": 10, "total_steps": 20, "config": config_to_dict(config), **extra}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


TOP1 = {("addition", 0): 0.90, ("addition", 1): 0.92, ("addition", 2): 0.91,
        ("gating", 0): 0.94, ("gating", 1): 0.95, ("gating", 2): 0.96}


@pytest.fixture
def compared(tmp_path: Path) -> Path:
    for (aggregation, seed), top1 in TOP1.items():
        write_run(tmp_path / f"a={aggregation},s={seed}", {"model.aggregation": aggregation, "train.seed": seed}, top1)
    write_run(tmp_path / "a=se,s=0", {"model.aggregation": "se", "train.seed": 0}, None, status="stopped")
    (tmp_path / "a=se,s=1").mkdir()
    (tmp_path / "a=se,s=1" / "events.json").write_text(json.dumps({"events": [
        {"time": 1, "event": "start"}, {"time": 2, "event": "gave_up", "failures": 4}]}))
    return tmp_path


def test_compare_groups_over_seeds_with_mean_std_n_and_welch_interval(compared: Path) -> None:
    table, keys, baseline, runs = compare.compare([str(compared)], ["model.aggregation=addition"])
    assert keys == ["model.aggregation"] and baseline == {"model.aggregation": "addition"}
    addition, gating = table
    assert (addition["model.aggregation"], addition["n"], gating["n"]) == ("addition", 3, 3)
    assert addition["top1_mean"] == pytest.approx(91.0) and gating["top1_mean"] == pytest.approx(95.0)
    assert addition["top1_std"] == pytest.approx(1.0) and gating["top1_std"] == pytest.approx(1.0)
    assert addition["is_baseline"] and gating["delta_top1"] == pytest.approx(4.0)
    # Welch: equal variances 1e-4 and n=3: se = sqrt(2/3)%, df = 4, t(0.975, 4) = 2.7764
    half = 2.776445 * (2 / 3) ** 0.5
    assert (gating["delta_low"], gating["delta_high"]) == (pytest.approx(4 - half, abs=1e-4),
                                                           pytest.approx(4 + half, abs=1e-4))
    # the stopped and the failed run are listed apart, not averaged in
    assert {run.name: run.state for run in runs if run.state != "finished"} == {"a=se,s=0": "unfinished",
                                                                              "a=se,s=1": "failed"}


def test_welch_interval_matches_scipys_welch_test() -> None:
    from scipy import stats

    a, b = [0.95, 0.97, 0.90, 0.93], [0.91, 0.90, 0.92]
    low, high = compare.welch_interval(a, b)
    result = stats.ttest_ind(a, b, equal_var=False)
    interval = result.confidence_interval(0.95)
    assert (low, high) == (pytest.approx(interval.low), pytest.approx(interval.high))
    assert compare.welch_interval([0.9], b) is None
    assert statistics.fmean(a) - statistics.fmean(b) == pytest.approx((low + high) / 2)


def test_compare_prints_md_csv_json_and_a_plot(compared: Path, capsys, tmp_path: Path) -> None:
    assert compare.main([str(compared), "--baseline", "model.aggregation=addition"]) == 0
    out = capsys.readouterr().out
    assert "| model.aggregation | n | top-1 % (mean ± std) |" in out
    assert "| gating | 3 | 95.00 ± 1.00 |" in out and "(baseline)" in out and "+4.00 [" in out
    assert "not in the table (2):" in out and "failed" in out and "Welch's t" in out
    assert compare.main([str(compared), "--format", "csv"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("model.aggregation,n,top1_mean,top1_std") and len(lines) == 3
    assert "not in the table" in captured.err
    assert compare.main([str(compared), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [group["n"] for group in data["groups"]] == [3, 3] and len(data["not_included"]) == 2
    png = tmp_path / "top1.png"
    assert compare.main([str(compared), "--plot", str(png), "--plot-x", "cost"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_compare_bad_inputs_are_one_line_and_exit_2(compared: Path, capsys, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [([str(empty)], f"no runs in {empty}"),
             ([str(compared / "a=se,s=1")], "no finished run to compare: no summary.json in"),
             ([str(compared), "--baseline", "model.degree=3"], "--baseline 'model.degree=3': give KEY=VALUE"),
             ([str(compared), "--baseline", "model.aggregation=film"], "no finished run has model.aggregation=film")]
    for args, message in cases:
        assert compare.main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


# ---------------------------------------------------------------------------------------- summary parts
def test_run_times_count_the_attempts_not_the_queue() -> None:
    from rkan_dist.run_summary import run_times

    events = [{"time": 100.0, "event": "start"}, {"time": 130.0, "event": "failure"},  # ran 30 s, then crashed
              {"time": 500.0, "event": "start"}, {"time": 501.0, "event": "restart"},  # 370 s in the queue
              {"time": 520.0, "event": "stop"}, {"time": 600.0, "event": "start"}]
    assert run_times(events, now=650.0) == (550.0, 30.0 + 20.0 + 50.0)
    assert run_times([], now=1.0) == (0.0, 0.0)


def test_hparams_are_written_once_into_the_runs_own_tb_folder(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    from rkan_dist.run_summary import write_hparams

    data = {"name": "model.aggregation=se,train.seed=2", "model": "rkan_resnet18", "written": 1000.0,
            "wall_seconds": 10.0, "overrides": {"model.aggregation": "se", "train.seed": 2, "model.rkan_stages": [3, 4]}}
    tb = tmp_path / "tb"
    assert write_hparams(tb, data) is not None and write_hparams(tb, data) is None
    assert [path.parent for path in tb.rglob("events.out.tfevents.*")] == [tb]  # no sub-folder
    accumulator = EventAccumulator(str(tb))
    accumulator.Reload()
    content = accumulator.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    assert start.hparams["model.aggregation"].string_value == "se" and start.hparams["train.seed"].number_value == 2
    assert start.hparams["model.rkan_stages"].string_value == "[3, 4]" and start.start_time_secs == 990.0
    assert metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG]).status == 1  # success
