"""Regenerate bench/REPORT.md and its PNG plots from the figures of `rkan-dist bench all`.

Called by `rkan-dist bench all --report` (what `make bench` runs); also runnable on a saved
result: `python -m bench.report bench/results/DATE.json`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "REPORT.md"
PLOTS = REPO / "bench" / "plots"

# (key, what it is, goal text, test of the goal)
HEADLINES = [
    ("kan_conv_speedup", "KAN conv: unfold reference time / fused time (fwd+bwd)", ">= 8", lambda v: v >= 8),
    ("kan_conv_memory_ratio", "KAN conv: reference memory / fused memory", ">= 8", lambda v: v >= 8),
    ("rkan_resnet50_throughput_ratio", "training img/s, rkan_resnet50 / resnet50", ">= 0.93 on CPU (paper 0.78)",
     lambda v: v >= 0.93),
    ("rkan_resnet50_activation_memory_ratio", "bytes saved for backward, rkan_resnet50 / resnet50 (batch 32, 224 px)",
     "<= 1.05 (reference-style 1.275)", lambda v: v <= 1.05),
    ("loader_vs_bare_ffcv", "img/s, our FFCV train loader / a bare FFCV Loader", ">= 0.9", lambda v: v >= 0.9),
    ("loader_vs_imagefolder", "img/s, our FFCV train loader / torchvision ImageFolder", ">= 3", lambda v: v >= 3),
    ("zero1_vs_ddp_step_ratio", "s/step, DeepSpeed ZeRO-1 / DDP (worse precision)", "<= 1.10", lambda v: v <= 1.10),
    ("checkpoint_stall_steps", "training stall per checkpoint save, in steps (demo)", "<= 1", lambda v: v <= 1),
    ("fault_goodput", "demo on the dev cluster: uninterrupted wall / wall with a crash, a 60 s hang and a preemption",
     ">= 0.5 (3 faults in a 3-min run)", lambda v: v >= 0.5),
    ("startup_gap_seconds", "launch to first finished step, demo --nproc 2: ours - a bare torchrun + DDP loop (s)",
     "<= 5", lambda v: v <= 5),
]


def _bar_plot(path: Path, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(labels))]
        axis.bar(positions, values, width=width, label=name)
    axis.set_xticks(range(len(labels)), labels, fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    if len(series) > 1:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _line_plot(path: Path, title: str, x: list[float], series: dict[str, list[float]], xlabel: str, ylabel: str,
               log: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for name, values in series.items():
        axis.plot(x, values, marker="o", label=name)
    if log:
        axis.set_yscale("log")
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _plots(benchmarks: dict) -> list[tuple[str, str]]:
    """(caption, file name) of every plot made from what the benchmarks returned."""
    PLOTS.mkdir(parents=True, exist_ok=True)
    made = []
    kan = benchmarks.get("kan_conv", {})
    if kan.get("sweep"):
        sweep = kan["sweep"]
        channels = [row["channels"] for row in sweep]
        _line_plot(PLOTS / "kan_conv_time.png", "KAN conv fwd+bwd time vs channels", channels,
                   {"fused": [r["fused_ms"] for r in sweep], "unfold reference": [r["unfold_ms"] for r in sweep]},
                   "channels", "ms", log=True)
        _line_plot(PLOTS / "kan_conv_memory.png", "KAN conv memory held for backward vs channels", channels,
                   {"fused": [r["fused_mib"] for r in sweep], "unfold reference": [r["unfold_mib"] for r in sweep]},
                   "channels", "MiB", log=True)
        made += [("KAN conv time against channel count", "kan_conv_time.png"),
                 ("KAN conv memory against channel count", "kan_conv_memory.png")]
    overhead = benchmarks.get("model_overhead", {})
    backbones = [key[len("rkan_"):-len("_backbone_img_s")] for key in overhead if key.endswith("_backbone_img_s")]
    if backbones:
        _bar_plot(PLOTS / "model_overhead.png", "training img/s, X vs rkan_X", backbones,
                  {"X": [overhead[f"rkan_{b}_backbone_img_s"] for b in backbones],
                   "rkan_X": [overhead[f"rkan_{b}_rkan_img_s"] for b in backbones]}, "img/s")
        made.append(("Training images/s of rkan_X against X", "model_overhead.png"))
    loaders = benchmarks.get("loaders", {})
    if "bare_ffcv_img_s" in loaders:
        _bar_plot(PLOTS / "loaders.png", "loader img/s", ["bare FFCV", "ours (FFCV)", "ImageFolder"],
                  {"img/s": [loaders["bare_ffcv_img_s"], loaders["our_loader_img_s"], loaders["imagefolder_img_s"]]},
                  "img/s")
        made.append(("Loader images/s", "loaders.png"))
    engines = benchmarks.get("engines", {})
    names = [key[: -len("_s_per_step")] for key in engines if key.endswith("_s_per_step")]
    if names:
        precisions = sorted({name.rsplit("_", 1)[1] for name in names})
        kinds = sorted({name.rsplit("_", 1)[0] for name in names}, key=lambda k: (k != "ddp", k))
        _bar_plot(PLOTS / "engines.png", "seconds per step, 2 processes", kinds,
                  {p: [engines.get(f"{k}_{p}_s_per_step", math.nan) for k in kinds] for p in precisions}, "s/step")
        made.append(("Seconds per step per engine and precision", "engines.png"))
    checkpoint = benchmarks.get("checkpoint", {})
    if checkpoint.get("rows"):
        rows = sorted(checkpoint["rows"], key=lambda r: r["parameters_m"])
        _line_plot(PLOTS / "checkpoint.png", "checkpoint save vs model size", [r["parameters_m"] for r in rows],
                   {"save s": [r["save_s"] for r in rows], "train step s": [r["step_s"] for r in rows]},
                   "parameters (M)", "seconds")
        made.append(("Checkpoint save time (and one training step) against model size", "checkpoint.png"))
    return made


def _table(rows: list[dict], columns: list[str]) -> list[str]:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return lines


GPU_CHECK = REPO / "bench" / "results" / "gpu_check.json"


def _gpu_check_lines(path: Path = GPU_CHECK) -> list[str]:
    """The section of bench/gpu_check.sh's figures, or the statement that no GPU has run it."""
    lines = ["", "## GPU check (`bench/gpu_check.sh`)", ""]
    check = json.loads(path.read_text()) if path.is_file() else {}
    if not check.get("cuda"):
        return lines + ["No GPU was lent to the sessions that built this project, so `bench/gpu_check.sh` has "
                        "run only on CPU (every part reports \"skipped: no CUDA\"). On a CUDA machine it writes "
                        "`bench/results/gpu_check.json`; `python -m bench.report RESULTS.json` then shows its "
                        "figures here."]
    lines.append(f"{check['device']}, torch {check.get('torch', '?')}, {check.get('date', '?')}.")
    for name, part in check.get("parts", {}).items():
        lines += ["", f"### {name}: {part.get('status')}", ""]
        if part.get("error"):
            lines.append(f"error: `{part['error']}`")
        rows = [{key: (json.dumps(value) if isinstance(value, dict) else value) for key, value in row.items()}
                for row in part.get("cases", [])]
        if rows:
            lines += _table(rows, list(rows[0].keys()))
        scalars = {k: v for k, v in part.items() if isinstance(v, int | float | str) and not isinstance(v, bool)
                   and k not in ("part", "status", "error", "traceback", "output_tail")}
        if scalars:
            lines += ["", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars.items()]
    return lines


def write_report(results: dict) -> Path:
    benchmarks = results.get("benchmarks", {})
    lines = [
        "# Benchmark report",
        "",
        f"Generated by `make bench` (`rkan-dist bench all --report`) on {results.get('date', '?')}"
        f"{' (quick variants)' if results.get('quick') else ''}; raw figures in `bench/results/`. Every figure is a "
        "ratio of two things measured side by side in one run on this shared 2-core CPU machine (medians of "
        "repeats, warm-up excluded); absolute times are only for orientation.",
        "",
        "## Headline figures",
        "",
        "| figure | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for key, text, goal, met in HEADLINES:
        value = results.get(key)
        if value is None:
            lines.append(f"| {text} (`{key}`) | not measured | {goal} | - |")
        else:
            lines.append(f"| {text} (`{key}`) | {value:.3f} | {goal} | {'yes' if met(value) else '**no**'} |")
    for name, result in benchmarks.items():
        lines += ["", f"## {name}", ""]
        table_rows = result.get("cases") or result.get("rows") or result.get("sweep")
        if table_rows:
            lines += _table(table_rows, list(table_rows[0].keys()))
        scalars = {k: v for k, v in result.items() if isinstance(v, int | float | str) and not isinstance(v, bool)}
        if scalars:
            lines += ["", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in scalars.items()]
    lines += _gpu_check_lines()
    plots = _plots(benchmarks)
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"**{caption}**\n\n![{caption}](plots/{name})\n" for caption, name in plots]
    OUT.write_text("\n".join(lines) + "\n")
    return OUT


if __name__ == "__main__":
    print(write_report(json.loads(Path(sys.argv[1]).read_text())))
