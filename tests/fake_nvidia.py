"""A stand-in `nvidia-smi` for the tests of a GPU node whose driver torch cannot use (rkan_dist.nvidia,
scripts/setup.sh): it answers the queries they make as the real one does, and records each call.
It goes first on the PATH of one subprocess or one monkeypatched test, never of the test session."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

OLD_DRIVER = "550.54.15"  # R550: older than the R580 a CUDA 13 build of torch needs
H100 = "NVIDIA H100 80GB HBM3"


def fake_nvidia_smi(folder: Path, driver: str = OLD_DRIVER, gpus: tuple[str, ...] = (H100, H100),
                    hang: bool = False) -> Path:
    """Write `folder`/nvidia-smi for a node with `gpus` and `driver`; returns `folder` (for PATH).
    Each call appends its arguments to `folder`/calls.log. `hang`: it never answers (a wedged driver)."""
    folder.mkdir(parents=True, exist_ok=True)
    query = "".join(f"echo {shlex.quote(f'{driver}, {name}')}\n" for name in gpus)
    listing = "".join(f"echo {shlex.quote(f'GPU {index}: {name} (UUID: GPU-{index:08d})')}\n"
                      for index, name in enumerate(gpus))
    script = folder / "nvidia-smi"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {shlex.quote(str(folder / "calls.log"))}
{"exec sleep 60" if hang else ""}
case "$*" in
  "--query-gpu=driver_version,name --format=csv,noheader")
{query}    ;;
  "--query-gpu=driver_version --format=csv,noheader")
    echo {shlex.quote(driver)} ;;
  "-L")
{listing}    ;;
  *) echo "fake nvidia-smi: unknown arguments $*" >&2; exit 2 ;;
esac
""")
    script.chmod(0o755)
    return folder


def calls(folder: Path) -> list[str]:
    log = folder / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def path_with(folder: Path) -> str:
    """PATH with `folder` first."""
    return f"{folder}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
