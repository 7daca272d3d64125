"""What every benchmark module shares: the `python -m bench.NAME [--quick] [--json FILE]` entry."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


def bench_main(run: Callable[[bool], dict], doc: str, quick_help: str, argv: list[str] | None = None) -> int:
    """Parse --quick/--json, run the benchmark (it prints its own table) and write its figures."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = run(args.quick)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0
