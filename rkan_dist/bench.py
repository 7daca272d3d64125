"""`rkan-dist bench NAME [--quick] [--json FILE] [--device auto|cpu]`: run the benchmarks under bench/ side by side.

Each benchmark module in the repository's bench/ folder exposes `run(quick: bool) -> dict` and
prints its own table; this entry point runs one or all of them and writes their figures as JSON.
Figures are ratios measured in one run (the machine is shared and noisy), never absolute times
compared across runs.

The benchmarks that can use a GPU take CUDA where torch can use it, as `device: auto` does, and
the same rule holds before any of them starts: NVIDIA GPUs that torch cannot use stop the run with
one line (exit 2) rather than measure the CPU beside them. `--device cpu` measures the CPU on
purpose: CUDA_VISIBLE_DEVICES="" hides the GPUs from this process and every process it starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from pathlib import Path

BENCHMARKS = ("kan_conv", "model_overhead", "loaders", "engines", "checkpoint", "startup", "faults")
HEADLINE_TABLES = ("startup_seconds",)  # {name: seconds} figures that also go to the top level
REPO = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, quick: bool) -> dict:
    if str(REPO) not in sys.path:  # bench/ is a folder of the repository, not of the package
        sys.path.insert(0, str(REPO))
    module = importlib.import_module(f"bench.{name}")
    started = time.perf_counter()
    result = module.run(quick=quick)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def choose_device(device: str) -> None:
    """Hide the GPUs for `--device cpu`; for auto, stop where NVIDIA GPUs are here but torch cannot use them."""
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # read when CUDA starts, which no benchmark has done yet
        return
    import torch

    from rkan_dist.faults import ConfigError
    from rkan_dist.nvidia import unusable_gpus_line

    if not torch.cuda.is_available():
        unusable = unusable_gpus_line(torch.__version__, torch.version.cuda, cpu_hint="pass --device cpu")
        if unusable is not None:
            raise ConfigError(unusable)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rkan-dist bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=(*BENCHMARKS, "all"))
    parser.add_argument("--quick", action="store_true", help="small variants, under a minute each")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--report", action="store_true",
                        help="(with all) also write bench/results/<date>.json and regenerate bench/REPORT.md")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto",
                        help="auto: CUDA where torch can use it, else the CPU; cpu: the CPU, GPUs hidden")
    args = parser.parse_args(argv)
    choose_device(args.device)
    names = BENCHMARKS if args.name == "all" else (args.name,)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "quick": args.quick, "benchmarks": {}}
    for name in names:
        print(f"\n== {name} ==", flush=True)
        results["benchmarks"][name] = run_benchmark(name, args.quick)
    for result in results["benchmarks"].values():  # the headline ratios at the top level
        results.update({key: value for key, value in result.items() if (isinstance(value, int | float)
                        and key != "wall_s") or key in HEADLINE_TABLES})
    text = json.dumps(results, indent=1, sort_keys=True, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    if args.report:
        from bench.report import write_report

        out = REPO / "bench" / "results" / f"{results['date']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out} and {write_report(results)}")
    return 0
