"""rkan-dist write: bad files reported, content and labels exact, atomic, byte-identical re-writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rkan_dist.data.beton import check_beton, read_labels
from rkan_dist.data.images import load_rgb
from rkan_dist.data.write import main, write_beton

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
SIDE = 24
GOOD_KINDS = ("rgb.jpg", "gray.png", "cmyk.jpg", "gray16.png", "alpha.png", "palette.gif")
BAD_KINDS = {
    "zero.jpg": "empty file",
    "notes.txt": "not an image",
    "truncated.jpg": "truncated or corrupt",
    "garbage.jpg": "not an image|corrupt",
}


def _make_good(path: Path, kind: str, rng: np.random.Generator) -> None:
    pixels = rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)
    if kind == "rgb.jpg":
        Image.fromarray(pixels).save(path, quality=92)
    elif kind == "gray.png":
        Image.fromarray(pixels[:, :, 0], mode="L").save(path)
    elif kind == "cmyk.jpg":
        Image.fromarray(np.dstack([pixels, pixels[:, :, :1]]), mode="CMYK").save(path)
    elif kind == "gray16.png":
        Image.fromarray(rng.integers(0, 65535, (SIDE, SIDE), dtype=np.uint16)).save(path)
    elif kind == "alpha.png":
        Image.fromarray(np.dstack([pixels, pixels[:, :, 1]]), mode="RGBA").save(path)
    elif kind == "palette.gif":
        Image.fromarray(pixels).convert("P").save(path, transparency=3)


def make_messy_tree(root: Path) -> tuple[list[tuple[Path, int]], dict[str, str]]:
    """Two classes, every good kind in each plus every bad kind; returns (good files in
    ImageFolder order with their class, {relative bad path: expected reason regex})."""
    rng = np.random.default_rng(0)
    good, bad = [], {}
    for label, name in enumerate(("cat", "dog")):
        folder = root / name
        folder.mkdir(parents=True)
        for index, kind in enumerate(GOOD_KINDS):
            path = folder / f"{index:02d}_{kind}"
            _make_good(path, kind, rng)
            good.append((path, label))
    reference = next(path for path, _ in good if path.name.endswith("rgb.jpg"))
    (root / "cat" / "zero.jpg").write_bytes(b"")
    (root / "cat" / "notes.txt").write_text("not a picture\n")
    (root / "dog" / "truncated.jpg").write_bytes(reference.read_bytes()[:300])
    (root / "dog" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + rng.bytes(700))
    (root / "README.md").write_text("a file outside any class folder\n")
    bad = {"cat/zero.jpg": BAD_KINDS["zero.jpg"], "cat/notes.txt": BAD_KINDS["notes.txt"],
           "dog/truncated.jpg": BAD_KINDS["truncated.jpg"], "dog/garbage.jpg": BAD_KINDS["garbage.jpg"],
           "README.md": "not inside a class folder"}
    good.sort(key=lambda item: (item[1], item[0].name))
    return good, bad


def decoded_images(beton: Path) -> np.ndarray:
    """Every image of a constant-size .beton, in file order, through FFCV's own Loader."""
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    loader = Loader(str(beton), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder()], "label": None})
    return np.concatenate([batch[0].copy() for batch in loader])


def test_every_good_image_is_written_exactly_and_every_bad_one_reported(tmp_path, capsys):
    good, bad = make_messy_tree(tmp_path / "tree")
    out = tmp_path / "messy.beton"
    assert main(["--src", str(tmp_path / "tree"), "--out", str(out), "--mode", "raw", "--workers", "2"]) == 0
    summary = capsys.readouterr().out
    assert f"wrote {len(good)} images" in summary and f"skipped {len(bad)}" in summary
    assert check_beton(out) == len(good)
    assert read_labels(out).tolist() == [label for _, label in good]
    images = decoded_images(out)
    for (path, _), image in zip(good, images):
        np.testing.assert_array_equal(image, load_rgb(path), err_msg=str(path))
    report = dict(line.split("\t", 1) for line in (tmp_path / "messy.beton.skipped.txt").read_text().splitlines())
    assert sorted(report) == sorted(bad)
    for path, reason in bad.items():
        assert any(word in report[path] for word in reason.split("|")), (path, report[path])
    assert json.loads((tmp_path / "messy.beton.classes.json").read_text()) == ["cat", "dog"]


def test_jpeg_mode_stores_close_pixels(tmp_path):
    folder = tmp_path / "tree" / "smooth"
    folder.mkdir(parents=True)
    ramp = np.linspace(0, 255, SIDE, dtype=np.float64)
    sources = []
    for index in range(3):  # smooth images: what JPEG is for (noise would be a test of JPEG, not of us)
        pixels = np.dstack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, -ramp) / 2 + 127,
                            np.full((SIDE, SIDE), 40.0 * index)]).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
        sources.append(pixels)
    out = tmp_path / "jpg.beton"
    write_beton(tmp_path / "tree", out, mode="jpg", quality=95, workers=1, progress=False)
    errors = [np.abs(image.astype(int) - source.astype(int)).mean() for source, image in zip(sources, decoded_images(out))]
    assert len(errors) == 3 and max(errors) < 4


def test_rewrites_are_byte_identical_whatever_the_worker_count(tmp_path):
    make_messy_tree(tmp_path / "tree")
    outputs = []
    for run, workers in enumerate((2, 2, 1)):
        out = tmp_path / f"run{run}.beton"
        write_beton(tmp_path / "tree", out, mode="proportion", workers=workers, progress=False)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    assert not list(tmp_path.glob("*.partial-*"))


def test_max_side_resizes_the_longer_side(tmp_path):
    folder = tmp_path / "tree" / "only"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((100, 60, 3), np.uint8)).save(folder / "tall.png")
    write_beton(tmp_path / "tree", tmp_path / "small.beton", max_side=50, mode="raw", workers=1, progress=False)
    from ffcv.reader import Reader

    record = Reader(str(tmp_path / "small.beton")).metadata["f0"][0]
    assert (int(record["height"]), int(record["width"])) == (50, 30)


@pytest.mark.timeout(240)
def test_a_killed_writer_leaves_nothing_under_the_final_name(tmp_path):
    rng = np.random.default_rng(1)
    for label in range(2):
        folder = tmp_path / "tree" / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(250):  # ~100 KB of noise each: many 8 MiB pages, several seconds of work
            Image.fromarray(rng.integers(0, 255, (220, 220, 3), dtype=np.uint8)).save(folder / f"{index}.jpg", quality=90)
    out = tmp_path / "big.beton"
    code = f"from rkan_dist.data.write import main; main(['--src', {str(tmp_path / 'tree')!r}, '--out', {str(out)!r}, '--workers', '1', '--quiet'])"
    writer = subprocess.Popen([sys.executable, "-c", code])
    partial = tmp_path / f"big.beton.partial-{writer.pid}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and writer.poll() is None:
        if partial.exists() and partial.stat().st_size > 3 * (1 << 23):  # a few pages are on disk: mid-way
            break
        time.sleep(0.01)
    assert writer.poll() is None, "the writer finished before it could be killed; make the tree bigger"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait(30)
    assert partial.exists() and not out.exists()
    assert not Path(f"{out}.classes.json").exists()
    # the next write finishes, and clears the dead writer's partial file
    write_beton(tmp_path / "tree", out, workers=2, progress=False)
    assert check_beton(out) == 500 and not partial.exists()


def test_flat_folder_with_imagenet_labels_csv(tmp_path):
    make_messy_tree(tmp_path / "train")
    write_beton(tmp_path / "train", tmp_path / "train.beton", mode="raw", workers=1, progress=False)
    val = tmp_path / "val"
    val.mkdir()
    rng = np.random.default_rng(2)
    truth = {"ILSVRC2012_val_00000001": "dog", "ILSVRC2012_val_00000002": "cat", "ILSVRC2012_val_00000003": "dog"}
    for image_id in [*truth, "ILSVRC2012_val_00000004", "ILSVRC2012_val_00000005"]:
        Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)).save(val / f"{image_id}.JPEG")
    rows = [f"{image_id},{synset} 1 2 3 4 {synset} 5 6 7 8" for image_id, synset in truth.items()]
    rows += ["ILSVRC2012_val_00000005,zebra 1 2 3 4", "ILSVRC2012_val_00000009,cat 1 2 3 4"]
    (tmp_path / "labels.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    code = main(["--src", str(val), "--out", str(tmp_path / "val.beton"), "--labels", str(tmp_path / "labels.csv"),
                 "--classes", str(tmp_path / "train.beton.classes.json"), "--mode", "raw", "--workers", "1", "--quiet"])
    assert code == 0
    assert read_labels(tmp_path / "val.beton").tolist() == [1, 0, 1]
    report = (tmp_path / "val.beton.skipped.txt").read_text()
    assert "ILSVRC2012_val_00000004.JPEG\tno label" in report
    assert "ILSVRC2012_val_00000005.JPEG\tclass 'zebra' is not in the classes file" in report
    assert "ILSVRC2012_val_00000009\tlisted in labels.csv but no such file" in report
    assert json.loads((tmp_path / "val.beton.classes.json").read_text()) == ["cat", "dog"]


@pytest.mark.parametrize("setup, args, message", [
    ("none", ["--src", "{tmp}/missing"], "no such directory"),
    ("no_classes", ["--src", "{tmp}/tree"], "no class folders"),
    ("empty_class", ["--src", "{tmp}/tree"], "is empty"),
    ("labels_only", ["--src", "{tmp}/tree", "--labels", "{tmp}/x.csv"], "--labels and --classes go together"),
    ("none", ["--src", "{tmp}", "--mode", "webp"], "invalid choice"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, setup, args, message):
    tree = tmp_path / "tree"
    tree.mkdir()
    if setup == "no_classes":
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tree / "loose.png")
    if setup == "empty_class":
        (tree / "a").mkdir()
        (tree / "b").mkdir()
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tree / "a" / "x.png")
    argv = [arg.format(tmp=tmp_path) for arg in args] + ["--out", str(tmp_path / "out.beton")]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.beton").exists()


def test_summary_counts_the_skips_per_reason(tmp_path, capsys):
    _, bad = make_messy_tree(tmp_path / "tree")
    out = tmp_path / "messy.beton"
    assert main(["--src", str(tmp_path / "tree"), "--out", str(out), "--mode", "raw", "--workers", "1", "--quiet"]) == 0
    summary = capsys.readouterr().out
    counts = {line.split(None, 1)[1]: int(line.split()[0]) for line in summary.splitlines()[1:]}
    assert sum(counts.values()) == len(bad), summary
    assert counts["not inside a class folder"] == 1 and counts["empty file"] == 1, summary
    assert counts.get("not an image", 0) + counts.get("truncated or corrupt image data", 0) == 3, summary


def write_flat_val(tmp_path: Path, synsets: dict[str, str]) -> tuple[Path, Path]:
    """A flat val folder (one JPEG per image id) and its LOC_val_solution.csv-style labels."""
    val = tmp_path / "val"
    val.mkdir()
    rng = np.random.default_rng(3)
    for image_id in synsets:
        Image.fromarray(rng.integers(0, 255, (SIDE, SIDE, 3), dtype=np.uint8)).save(val / f"{image_id}.JPEG")
    rows = [f"{image_id},{synset} 1 2 3 4" for image_id, synset in synsets.items()]
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return val, labels


def test_labels_naming_unknown_classes_are_a_warning_with_count_and_names(tmp_path, capsys):
    (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog"]))
    synsets = {"v1": "cat", "v2": "zebra", "v3": "okapi", "v4": "zebra", "v5": "dog"}
    val, labels = write_flat_val(tmp_path, synsets)
    argv = ["--src", str(val), "--out", str(tmp_path / "val.beton"), "--labels", str(labels),
            "--classes", str(tmp_path / "classes.json"), "--mode", "raw", "--workers", "1", "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipped 3" in captured.out and "3  label names a class not in the classes file" in captured.out
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1, captured.err
    assert "3 label(s) name a class that is not in" in warning[0] and "2 distinct: 'zebra', 'okapi'" in warning[0]
    assert read_labels(tmp_path / "val.beton").tolist() == [0, 1]


@pytest.mark.parametrize("case", ["unknown_class", "unreadable_image"])
def test_strict_exits_1_and_writes_nothing_under_the_final_name(tmp_path, capsys, case):
    if case == "unknown_class":  # found while listing: stops before encoding
        (tmp_path / "classes.json").write_text(json.dumps(["cat", "dog"]))
        val, labels = write_flat_val(tmp_path, {"v1": "cat", "v2": "zebra"})
        argv = ["--src", str(val), "--labels", str(labels), "--classes", str(tmp_path / "classes.json")]
        expected = "1 label names a class not in the classes file"
    else:  # found while decoding
        tree = tmp_path / "tree"
        (tree / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tree / "a" / "ok.png")
        (tree / "a" / "zero.jpg").write_bytes(b"")
        argv = ["--src", str(tree)]
        expected = "1 empty file"
    out = tmp_path / "out.beton"
    assert main([*argv, "--out", str(out), "--mode", "raw", "--workers", "1", "--quiet", "--strict"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--strict" in err and expected in err and "nothing written" in err, err
    assert not out.exists() and not Path(f"{out}.classes.json").exists()
    assert not list(tmp_path.glob("out.beton.partial-*"))
    assert len(Path(f"{out}.skipped.txt").read_text().splitlines()) == 1
    # without --strict the same input writes
    assert main([*argv, "--out", str(out), "--mode", "raw", "--workers", "1", "--quiet"]) == 0
    assert check_beton(out) == 1
