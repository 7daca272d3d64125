"""`rkan-dist compare DIR...`: the table an ablation is judged by, with the spread over seeds.

    rkan-dist compare runs/ablations/demo [more grid or run folders] [--baseline model.aggregation=addition]
                      [--format md|csv|json] [--plot top1.png [--plot-x params|flops|cost]]

Reads only each run's summary.json (rkan_dist.run_summary). Finished runs are grouped by every
override of the compared runs except train.seed (each run's resolved value of that key, so a run
started on its own joins the group its config belongs to); a group shows n, the mean ± sample std
of final val top-1 over its seeds, top-5, params, FLOPs, images/s and the cost per run. With
`--baseline KEY=VALUE` (repeatable), Δ is a group's mean top-1 minus that of the group with
KEY=VALUE and the same other overrides (in a crossed grid), or else of the one group with KEY=VALUE
(runs listed one by one, e.g. against the plain backbone), with a 95% interval from Welch's t
(unequal variances, Welch-Satterthwaite degrees of freedom; at least 2 seeds on each side). Runs
still going, waiting, failed or not started are listed apart and never averaged in.

A DIR is a run folder, a grid folder (its grid.json lists the runs, started or not), or a folder
holding run folders. A DIR with no run in it, or runs of which none has a summary yet, is one line
and exit 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rkan_dist.faults import EXIT_USAGE, ConfigError
from rkan_dist.grid import GRID_NAME, SEED_KEY, read_grid_record
from rkan_dist.ledger import LEDGER_NAME
from rkan_dist.run_summary import RUN_NAME, SUMMARY_NAME, ledger_state, read_summary

TEST_NAME = "Welch's t"
CONFIDENCE = 0.95


@dataclass
class Run:
    folder: Path
    summary: dict[str, Any] | None

    @property
    def name(self) -> str:
        return (self.summary or {}).get("name", self.folder.name)

    @property
    def state(self) -> str:
        """finished | unfinished (training, or waiting to continue) | failed | not started."""
        status = (self.summary or {}).get("status")
        if status == "finished":
            return "finished"
        ledger = ledger_state(self.folder)
        if status == "nonfinite" or ledger == "failed":
            return "failed"
        return "unfinished" if ledger is not None or self.summary is not None else "not started"


@dataclass
class Group:
    values: dict[str, Any]  # override key -> resolved value (the seed left out)
    runs: list[Run] = field(default_factory=list)

    def numbers(self, key: str) -> list[float]:
        return [run.summary[key] for run in self.runs if isinstance(run.summary.get(key), int | float)]

    def mean(self, key: str) -> float | None:
        values = self.numbers(key)
        return statistics.fmean(values) if values else None

    def std(self, key: str) -> float | None:
        values = self.numbers(key)
        return statistics.stdev(values) if len(values) >= 2 else None


# ------------------------------------------------------------------------------------ finding runs
def is_run_folder(path: Path) -> bool:
    return any((path / name).is_file() for name in (SUMMARY_NAME, RUN_NAME, LEDGER_NAME))


def find_runs(folders: list[str]) -> list[Run]:
    runs: dict[Path, Run] = {}
    empty = []
    for text in folders:
        folder = Path(text).expanduser().absolute()
        if is_run_folder(folder):
            found = [folder]
        else:
            listed = [folder / run["name"] for run in read_grid_record(folder).get("runs", [])]
            found = listed + sorted(path for path in folder.glob("*/") if is_run_folder(path) and path not in listed)
        if not found:
            empty.append(text)
        for path in found:
            runs.setdefault(path, Run(path, read_summary(path)))
    if empty:
        raise ConfigError(f"no runs in {', '.join(empty)}: no {SUMMARY_NAME}, {RUN_NAME} or {LEDGER_NAME} (a run folder), "
                          f"no {GRID_NAME} (a grid folder), and no run folders inside")
    if not any(run.state == "finished" for run in runs.values()):
        names = [str(run.folder) for run in runs.values() if run.summary is None]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ConfigError(f"no finished run to compare: no {SUMMARY_NAME} in {shown or 'any of them'}"
                          + ("" if names else " (the summaries say none has finished)"))
    return list(runs.values())


# ------------------------------------------------------------------------------------ grouping
def config_value(summary: dict[str, Any], key: str) -> Any:
    section, name = key.split(".")
    return summary.get("config", {}).get(section, {}).get(name)


def group_keys(runs: list[Run]) -> list[str]:
    keys = [key for run in runs if run.summary for key in run.summary.get("overrides", {})]
    return [key for key in dict.fromkeys(keys) if key != SEED_KEY]


def group_runs(runs: list[Run], keys: list[str]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs:
        values = {key: config_value(run.summary, key) for key in keys}
        groups.setdefault(json.dumps(values, sort_keys=True), Group(values)).runs.append(run)
    return list(groups.values())


def parse_baseline(texts: list[str], keys: list[str], groups: list[Group]) -> dict[str, Any]:
    """--baseline KEY=VALUE (repeatable) -> {key: value}, each checked against the finished runs."""
    baseline = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or key not in keys:
            raise ConfigError(f"--baseline {text!r}: give KEY=VALUE with KEY one of the overrides these runs differ "
                              f"in: {', '.join(keys) or '(none: every run has the same overrides)'}")
        baseline[key] = yaml.safe_load(value) if value.strip() else ""
        present = list(dict.fromkeys(_value(group.values[key]) for group in groups))
        if _value(baseline[key]) not in present:
            raise ConfigError(f"--baseline {text!r}: no finished run has {key}={value}; finished runs have "
                              f"{key} in {', '.join(present)}")
    if not any(_matches(group, baseline) for group in groups):
        raise ConfigError(f"--baseline {' '.join(texts)}: no finished run has all of these")
    return baseline


def _matches(group: Group, values: dict[str, Any]) -> bool:
    return all(json.dumps(group.values[key]) == json.dumps(value) for key, value in values.items())


def baseline_of(group: Group, groups: list[Group], baseline: dict[str, Any]) -> Group | None:
    """The group with the baseline's values and this group's other overrides (a crossed grid); failing
    that, the one group with the baseline's values (runs listed one by one, e.g. against the plain
    backbone); else None."""
    exact = next((other for other in groups if _matches(other, {**group.values, **baseline})), None)
    if exact is not None:
        return exact
    candidates = [other for other in groups if _matches(other, baseline)]
    return candidates[0] if len(candidates) == 1 else None


def baseline_text(baseline: dict[str, Any]) -> str:
    return ", ".join(f"{key}={_value(value)}" for key, value in baseline.items())


def welch_interval(a: list[float], b: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The `confidence` interval of mean(a) - mean(b) by Welch's t; None with fewer than 2 values on a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats  # scikit-learn's dependency, so installed with rkan-dist

    difference = statistics.fmean(a) - statistics.fmean(b)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return difference, difference
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df)) * se
    return difference - half, difference + half


# ------------------------------------------------------------------------------------ the table
def rows(groups: list[Group], baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per group, numbers in their units (accuracies in %), sorted by the group's values."""
    out = []
    for group in groups:
        row: dict[str, Any] = {**group.values, "n": len(group.runs)}
        for metric in ("top1", "top5", "ema_top1"):
            mean, std = group.mean(metric), group.std(metric)
            row[f"{metric}_mean"] = None if mean is None else 100 * mean
            row[f"{metric}_std"] = None if std is None else 100 * std
        if baseline is not None:
            reference = baseline_of(group, groups, baseline)
            row["is_baseline"] = reference is group
            if reference is None:
                row["delta_top1"] = row["delta_low"] = row["delta_high"] = None
            else:
                ours, theirs = group.numbers("top1"), reference.numbers("top1")
                row["delta_top1"] = 100 * (statistics.fmean(ours) - statistics.fmean(theirs))
                interval = welch_interval(ours, theirs) if reference is not group else None
                row["delta_low"], row["delta_high"] = (None, None) if interval is None else (100 * interval[0],
                                                                                             100 * interval[1])
        row["params"] = group.mean("params")
        row["flops"] = group.mean("flops")
        row["images_per_s"] = group.mean("images_per_s")
        row["device_hours"] = group.mean("device_hours")
        units = {run.summary.get("device_hours_unit") for run in group.runs}
        row["device_hours_unit"] = units.pop() if len(units) == 1 else "device-hours"
        out.append(row)
    keys = list(groups[0].values) if groups else []
    return sorted(out, key=lambda row: [_sort_key(row[key]) for key in keys])


def _sort_key(value: Any) -> tuple[int, Any]:
    """Numbers by value, everything else by its text (a column may mix them)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return 0, value
    return 1, json.dumps(value)


def _number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, list) else str(value)


def markdown(table: list[dict[str, Any]], keys: list[str], baseline: dict[str, Any] | None) -> str:
    unit = table[0]["device_hours_unit"] if table else "device-hours"
    header = [*keys, "n", "top-1 % (mean ± std)", "top-5 %"]
    if any(row["ema_top1_mean"] is not None for row in table):
        header.append("EMA top-1 %")
    if baseline is not None:
        header.append(f"Δ top-1 vs {baseline_text(baseline)} [95% CI]")
    header += ["params (M)", "GFLOPs", "img/s", f"{unit} per run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table:
        cells = [_value(row[key]) for key in keys]
        spread = "" if row["top1_std"] is None else f" ± {row['top1_std']:.2f}"
        cells += [str(row["n"]), f"{_number(row['top1_mean'])}{spread}", _number(row["top5_mean"])]
        if "EMA top-1 %" in header:
            cells.append(_number(row["ema_top1_mean"]))
        if baseline is not None:
            if row["delta_top1"] is None:
                cells.append("–")
            elif row["delta_low"] is None:
                cells.append("(baseline)" if row["is_baseline"] else f"{row['delta_top1']:+.2f} [needs ≥ 2 seeds each]")
            else:
                cells.append(f"{row['delta_top1']:+.2f} [{row['delta_low']:+.2f}, {row['delta_high']:+.2f}]")
        cells += [_number(None if row["params"] is None else row["params"] / 1e6, 3),
                  _number(None if row["flops"] is None else row["flops"] / 1e9, 3),
                  _number(row["images_per_s"], 1), _number(row["device_hours"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def apart_lines(runs: list[Run]) -> list[str]:
    """Runs left out of the table, and why."""
    lines = []
    for run in runs:
        if run.state == "finished":
            continue
        summary = run.summary or {}
        where = f"step {summary['steps']} of {summary['total_steps']}" if "steps" in summary else "no summary yet"
        lines.append(f"  {run.state:<12} {run.name}  ({where}; {run.folder})")
    return lines


def plot(table: list[dict[str, Any]], keys: list[str], path: str, x: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib (or rkan-dist[bench])") from None
    scale, label = {"params": (1e-6, "parameters (M)"), "flops": (1e-9, "GFLOPs (forward, one image)"),
                    "cost": (1.0, f"{table[0]['device_hours_unit']} per run")}[x]
    column = "device_hours" if x == "cost" else x
    figure, axes = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for row in table:
        if row[column] is None or row["top1_mean"] is None:
            continue
        text = ", ".join(_value(row[key]) for key in keys) or "all runs"
        axes.errorbar(row[column] * scale, row["top1_mean"], yerr=row["top1_std"] or 0.0, fmt="o", capsize=4,
                      label=f"{text} (n={row['n']})")
        axes.annotate(text, (row[column] * scale, row["top1_mean"]), textcoords="offset points", xytext=(6, 4),
                      fontsize=8)
    axes.set_xlabel(label)
    axes.set_ylabel("val top-1 % (mean ± std over seeds)")
    axes.set_title(" x ".join(keys) or "runs")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def compare(folders: list[str], baseline_texts: list[str] | None = None) -> tuple[
        list[dict[str, Any]], list[str], dict[str, Any] | None, list[Run]]:
    runs = find_runs(folders)
    finished = [run for run in runs if run.state == "finished"]
    keys = group_keys(finished)
    groups = group_runs(finished, keys)
    baseline = parse_baseline(baseline_texts, keys, groups) if baseline_texts else None
    return rows(groups, baseline), keys, baseline, runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rkan-dist compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", metavar="DIR", help="grid folders, run folders, or folders of runs")
    parser.add_argument("--baseline", metavar="KEY=VALUE", action="append",
                        help="Δ top-1 to the group with KEY=VALUE (e.g. model.aggregation=addition) and the same "
                        "other overrides, with a 95%% interval by Welch's t over the seeds; repeat to name a "
                        "baseline by several keys")
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md")
    parser.add_argument("--plot", metavar="FILE.png", help="draw top-1 (mean ± std) against --plot-x")
    parser.add_argument("--plot-x", choices=("params", "flops", "cost"), default="params")
    args = parser.parse_args(argv)
    try:
        table, keys, baseline, runs = compare(args.folders, args.baseline)
        if args.plot:
            plot(table, keys, args.plot, args.plot_x)
    except ConfigError as err:
        print(f"rkan-dist compare: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    apart = apart_lines(runs)
    if args.format == "json":
        print(json.dumps({"keys": keys, "seed_key": SEED_KEY, "baseline": baseline, "interval": f"{CONFIDENCE:.0%} {TEST_NAME}",
                          "groups": table, "not_included": [{"name": run.name, "state": run.state,
                                                             "folder": str(run.folder)}
                                                            for run in runs if run.state != "finished"]}, indent=1))
    elif args.format == "csv":
        output = io.StringIO()
        writer = csv.DictWriter(output, fieldnames=list(table[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: _value(value) if isinstance(value, list) else value for key, value in row.items()}
                         for row in table)
        print(output.getvalue(), end="")
        if apart:  # stdout stays one CSV table
            print("not in the table:\n" + "\n".join(apart), file=sys.stderr)
    else:
        print(markdown(table, keys, baseline))
        finished = sum(run.state == "finished" for run in runs)
        print(f"\n{finished} finished runs in {len(table)} groups (by {', '.join(keys) or 'nothing'}; {SEED_KEY} "
              f"varies within a group); top-1/top-5: final val accuracy"
              + (f"; Δ: {CONFIDENCE:.0%} interval by {TEST_NAME} over seeds" if baseline else ""))
        if apart:
            print(f"not in the table ({len(apart)}):\n" + "\n".join(apart))
    if args.plot:
        print(f"plot: {args.plot}", file=sys.stderr if args.format != "md" else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
