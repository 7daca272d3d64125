"""What every benchmark module shares: the `python -m bench.NAME [--quick] [--json FILE]` entry."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def saved_storages(forward: Callable[[], Any], parameters) -> tuple[Any, dict[int, int]]:
    """Run `forward` and return its output and {storage address: bytes} of every distinct tensor
    storage autograd saved for backward, parameters excluded: the activation memory a training
    step holds from forward to backward (CPU has no peak-allocation counter to read instead)."""
    import torch

    skip = {p.untyped_storage().data_ptr() for p in parameters}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    return out, saved
