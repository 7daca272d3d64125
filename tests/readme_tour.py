"""The README's tour as data, for the tests that run it: its commands per step, a small generated
ImageNet-layout tree to run them on, and the rewrites that scale them down.

The commands run as written through bash; the only rewrites are the /data and /datasets paths
(pointed into a temporary folder) and arguments appended at the end (scaled-down overrides,
resources the local machine has). A command this module does not know how to scale fails the
test: a changed tour must be looked at, not skipped.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SYNSETS = ("n01440764", "n01443537", "n01484850", "n01491361")
TRAIN_PER_CLASS = 6
VAL_PER_CLASS = 3

# A run of a few steps on 32 px images of 4 classes; fp32 keeps it independent of the CPU.
SCALE_TRAIN = ["model.name=rkan_resnet18", f"model.num_classes={len(SYNSETS)}", "data.batch_size=4",
               "data.val_batch_size=8", "data.num_workers=1", "data.min_res=32", "data.max_res=32", "data.val_res=32",
               "logging.progress_bar=false", "logging.every_steps=1", "train.precision=fp32"]
LOCAL_SLURM = ["--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--partition", "debug", "--time", "30"]


def tour_steps(readme: Path = README) -> dict[int, list[str]]:
    """{step number: [command, ...]} of the bash block under '## A short tour', continuations joined."""
    section = readme.read_text().split("## A short tour", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    assert match, "README: no ```bash block under '## A short tour'"
    steps: dict[int, list[str]] = {}
    step = None
    for line in match.group(1).replace("\\\n", " ").splitlines():
        line = line.strip()
        numbered = re.match(r"#\s*(\d+)\.", line)
        if numbered:
            step = int(numbered.group(1))
            steps[step] = []
        elif line and not line.startswith("#"):
            assert step is not None, f"README tour: command before the first numbered comment: {line}"
            steps[step].append(line)
    return steps


def make_imagenet_tree(root: Path) -> Path:
    """root/data/imagenet/{train/<synset>/*.JPEG, val/ILSVRC2012_val_*.JPEG, LOC_val_solution.csv}."""
    imagenet = root / "data" / "imagenet"
    rng = np.random.default_rng(0)

    def image(label: int) -> Image.Image:  # one colour per class, some noise, not square
        pixels = np.full((40, 48, 3), 60 * label, dtype=np.int16) + rng.integers(0, 60, (40, 48, 3))
        return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))

    for label, synset in enumerate(SYNSETS):
        folder = imagenet / "train" / synset
        folder.mkdir(parents=True)
        for index in range(TRAIN_PER_CLASS):
            image(label).save(folder / f"{synset}_{index}.JPEG", quality=90)
    (imagenet / "val").mkdir()
    rows = ["ImageId,PredictionString"]
    for index in range(VAL_PER_CLASS * len(SYNSETS)):
        label = index % len(SYNSETS)
        image_id = f"ILSVRC2012_val_{index + 1:08d}"
        image(label).save(imagenet / "val" / f"{image_id}.JPEG", quality=90)
        rows.append(f"{image_id},{SYNSETS[label]} 1 2 30 40 {SYNSETS[label]} 5 6 20 30")
    (imagenet / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return imagenet


def workspace(root: Path) -> Path:
    """The folder the tour runs in: it sees the repository's configs/, and writes runs/ of its own."""
    work = root / "work"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    return work


def localize(command: str, root: Path) -> str:
    """/data/imagenet and /datasets/imagenet -> the generated tree and an output folder under root."""
    return command.replace("/datasets/imagenet", f"{root}/datasets/imagenet").replace(
        "/data/imagenet", f"{root}/data/imagenet")


def scaled(command: str, *, max_steps: int) -> str:
    """The command with its scaled-down arguments appended (options last: argparse keeps the last)."""
    def append(*extra: str) -> str:
        return f"{command} {shlex.join(extra)}" if extra else command

    if command.startswith("rkan-dist write"):
        return append("--workers", "1", "--quiet")
    if command.startswith("rkan-dist train"):
        return append(*SCALE_TRAIN, f"train.max_steps={max_steps}", "--nproc", "2")
    if command.startswith("rkan-dist submit"):
        return append(*SCALE_TRAIN, f"train.max_steps={max_steps}", *LOCAL_SLURM)
    if command.startswith("tensorboard"):
        return append("--inspect")  # prints what the logdir holds and exits, instead of serving
    if command.startswith(("mkdir ", "rkan-dist eval", "rkan-dist export", "python -c")):
        return command
    raise AssertionError(f"the README tour has a command this test does not know how to scale down: {command}")


def run(command: str, cwd: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    """bash -c the command with this interpreter's bin folder (rkan-dist, tensorboard, python) first on PATH."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"$ {command}\nexit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result
