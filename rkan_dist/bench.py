"""`rkan-dist bench NAME [--quick] [--json FILE]`: run the benchmarks under bench/ side by side.

Each benchmark module in the repository's bench/ folder exposes `run(quick: bool) -> dict` and
prints its own table; this entry point runs one or all of them and writes their figures as JSON.
Figures are ratios measured in one run (the machine is shared and noisy), never absolute times
compared across runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rkan-dist bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=(*BENCHMARKS, "all"))
    parser.add_argument("--quick", action="store_true", help="small variants, under a minute each")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--report", action="store_true",
                        help="(with all) also write bench/results/<date>.json and regenerate bench/REPORT.md")
    args = parser.parse_args(argv)
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
