"""`rkan-dist write`: an ImageFolder tree (or ImageNet's flat val folder + labels CSV) -> .beton.

    rkan-dist write --src train/ --out train.beton [--max-side 512] [--quality 90]
                    [--mode jpg|raw|proportion] [--compress-probability 0.5] [--workers N]
    rkan-dist write --src val/ --out val.beton --labels LOC_val_solution.csv --classes train.beton.classes.json

Class index = position of the class folder's name in sorted order (torchvision's ImageFolder
rule, and files are visited in ImageFolder's order too, so sample i is the same image in both
loaders when the tree is clean). Beside the output: FILE.beton.classes.json (the class names)
and, when anything was skipped, FILE.beton.skipped.txt (one "path<TAB>reason" line per file).

Guarantees: a bad file never crashes the write and is never dropped silently (the summary counts
the skips per reason, and val labels naming a class the classes file lacks are a warning of their
own); with --strict any skip exits 1 and nothing is written under FILE.beton; the .beton
appears under its name only when complete (written as FILE.beton.partial-PID, then renamed);
writing the same tree twice gives byte-identical files (decoding runs in parallel but results
are consumed in a fixed order, and 'proportion' draws its coin from the sample index).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import multiprocessing
import os
import re
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from rkan_dist.data.images import UnreadableImage, load_rgb
from rkan_dist.faults import EXIT_USAGE

if TYPE_CHECKING:
    from ffcv.fields import RGBImageField

WRITE_MODES = ("jpg", "raw", "proportion")
CLASSES_SUFFIX = ".classes.json"
SKIPPED_SUFFIX = ".skipped.txt"


class WriteError(ValueError):
    """Bad command-line input (missing folder, no classes, ...); main() prints it and returns 2."""


class StrictSkipError(WriteError):
    """--strict and some file was skipped: nothing was written under the final name; exit 1."""


# Skip kinds: the per-reason counts of the summary. The report keeps each file's full reason.
OUTSIDE_CLASS = "not inside a class folder"
NO_LABEL = "no label in the labels CSV"
UNKNOWN_CLASS = "label names a class not in the classes file"
NO_FILE = "listed in the labels CSV but no such file"
TOO_LARGE = "too large to store"


@dataclass(frozen=True)
class Skip:
    path: str
    kind: str  # one of the constants above, or the unreadable-image reason without its detail
    reason: str  # the whole reason, for the report
    label: str = ""  # UNKNOWN_CLASS: the class name the labels CSV gave


def _kind_of(reason: str) -> str:
    """'truncated or corrupt image data: <detail>' -> 'truncated or corrupt image data'."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip()


@dataclass
class WriteSummary:
    out: Path
    written: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path relative to --src, reason)
    bytes: int = 0
    seconds: float = 0.0
    classes: list[str] = field(default_factory=list)
    skip_counts: dict[str, int] = field(default_factory=dict)  # kind -> files, most frequent first
    unknown_classes: dict[str, int] = field(default_factory=dict)  # class named by a label -> files

    def describe(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        text = (f"wrote {self.written} images to {self.out} ({self.bytes / 2**20:.1f} MiB, {len(self.classes)} classes) "
                f"in {self.seconds:.1f} s ({rate:.0f} img/s); skipped {len(self.skipped)}")
        if self.skipped:
            text += f" (listed with reasons in {self.out}{SKIPPED_SUFFIX}):\n" + describe_skips(self.skip_counts)
        return text


def describe_skips(counts: dict[str, int]) -> str:
    """One indented line per skip kind: '     12  not an image'."""
    return "\n".join(f"  {count:6d}  {kind}" for kind, count in counts.items())


def unknown_classes_warning(unknown: dict[str, int], classes_file: str | os.PathLike | None, shown: int = 5) -> str:
    """'N labels name classes that are not in FILE (K distinct: a, b, ...)' for the write's end."""
    names = sorted(unknown, key=lambda name: (-unknown[name], name))
    listed = ", ".join(repr(name) for name in names[:shown]) + (", ..." if len(names) > shown else "")
    return (f"{sum(unknown.values())} label(s) name a class that is not in {classes_file} ({len(names)} distinct: "
            f"{listed}); those images were skipped. Was val written with the train file's --classes?")


def classes_path(beton: str | os.PathLike) -> Path:
    return Path(f"{beton}{CLASSES_SUFFIX}")


def read_classes(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    try:
        classes = json.loads(path.read_text())
    except FileNotFoundError:
        raise WriteError(f"classes file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise WriteError(f"classes file {path} is not valid JSON: {err}") from None
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes) or not classes:
        raise WriteError(f"classes file {path} must hold a non-empty JSON list of class names")
    return classes


# ---------------------------------------------------------------- what to write, in which order

def scan_class_tree(src: Path) -> tuple[list[str], list[tuple[str, int]], list[Skip]]:
    """(classes, [(file, class index)], the files outside any class folder)."""
    if not src.is_dir():
        raise WriteError(f"--src: no such directory: {src}")
    entries = sorted(os.scandir(src), key=lambda entry: entry.name)
    classes = [entry.name for entry in entries if entry.is_dir(follow_symlinks=True)]
    outside = [Skip(entry.path, OUTSIDE_CLASS, OUTSIDE_CLASS) for entry in entries
               if not entry.is_dir(follow_symlinks=True)]
    if not classes:
        raise WriteError(f"--src {src} has no class folders (expected one sub-folder per class, as in ImageNet's train/; "
                         f"for a flat folder pass --labels and --classes)")
    samples = []
    for index, name in enumerate(classes):
        files = [os.path.join(root, filename)
                 for root, _, filenames in sorted(os.walk(src / name, followlinks=True))
                 for filename in sorted(filenames)]
        if not files:
            raise WriteError(f"class folder {src / name} is empty")
        samples += [(path, index) for path in files]
    return classes, samples, outside


def scan_labelled_folder(src: Path, labels_csv: Path, classes: list[str]
                         ) -> tuple[list[tuple[str, int]], list[Skip]]:
    """A flat folder labelled by a CSV in ImageNet's LOC_val_solution.csv format:
    ImageId,PredictionString with the synset as the first word of the prediction string."""
    if not src.is_dir():
        raise WriteError(f"--src: no such directory: {src}")
    if not labels_csv.is_file():
        raise WriteError(f"--labels: no such file: {labels_csv}")
    synset_of = {}
    with open(labels_csv, newline="") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            if not row or (line_number == 1 and row[0].strip().lower() == "imageid"):
                continue
            if len(row) < 2 or not row[1].split():
                raise WriteError(f"{labels_csv}:{line_number}: expected 'image id,synset ...', got {','.join(row)!r}")
            synset_of[row[0].strip()] = row[1].split()[0]
    if not synset_of:
        raise WriteError(f"--labels {labels_csv} holds no labels")
    class_index = {name: index for index, name in enumerate(classes)}
    files = sorted(entry.name for entry in os.scandir(src) if entry.is_file(follow_symlinks=True))
    if not files:
        raise WriteError(f"--src {src} holds no files")
    samples, skipped, seen = [], [], set()
    for filename in files:
        path = os.path.join(src, filename)
        image_id = filename.split(".", 1)[0]
        synset = synset_of.get(image_id)
        seen.add(image_id)
        if synset is None:
            skipped.append(Skip(path, NO_LABEL, f"no label for image id {image_id!r} in {labels_csv.name}"))
        elif synset not in class_index:
            skipped.append(Skip(path, UNKNOWN_CLASS, f"class {synset!r} is not in the classes file", synset))
        else:
            samples.append((path, class_index[synset]))
    skipped += [Skip(str(src / image_id), NO_FILE, f"listed in {labels_csv.name} but no such file")
                for image_id in sorted(set(synset_of) - seen)]
    return samples, skipped


# ---------------------------------------------------------------- parallel decode + encode

_field: RGBImageField | None = None


def _init_worker(image_field: RGBImageField) -> None:
    global _field
    _field = image_field
    import cv2

    cv2.setNumThreads(1)  # the pool is the parallelism; cv2's own threads would oversubscribe


def _encode_sample(index: int, path: str) -> tuple:
    """('ok', image metadata, payload) or ('skip', reason). Never raises: a crash here would be
    a lost file, and the report must name every file that did not make it."""
    try:
        image = load_rgb(path)
        destination = np.zeros(1, dtype=_field.metadata_type)
        captured = []

        def capture(size: int):
            buffer = np.empty(size, dtype=np.uint8)
            captured.append(buffer)
            return 0, buffer

        np.random.seed(index % 2**32)  # 'proportion' mode's coin: a function of the sample, not of timing
        _field.encode(destination, image, capture)
        return "ok", destination[0], captured[0].tobytes()
    except UnreadableImage as err:
        return "skip", str(err)
    except Exception as err:  # noqa: BLE001 - any failure must become a reported skip
        return "skip", f"could not encode: {type(err).__name__}: {err}"


def _encode_chunk(chunk: list[tuple[int, str]]) -> list[tuple]:
    return [_encode_sample(index, path) for index, path in chunk]


def _encoded_in_order(paths: list[str], image_field: RGBImageField, workers: int, chunk_size: int = 16
                      ) -> Iterator[tuple]:
    """Results of _encode_sample for every path, in input order, with bounded look-ahead."""
    tasks = list(enumerate(paths))
    chunks = [tasks[start:start + chunk_size] for start in range(0, len(tasks), chunk_size)]
    if workers <= 1:
        _init_worker(image_field)
        for chunk in chunks:
            yield from _encode_chunk(chunk)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # ProcessPoolExecutor (not Pool): a worker killed by the OOM killer raises BrokenProcessPool
    # instead of hanging the parent forever.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                initargs=(image_field,)) as pool:
        pending: deque = deque()
        next_chunk = 0
        while next_chunk < len(chunks) or pending:
            while next_chunk < len(chunks) and len(pending) < 4 * workers:
                pending.append(pool.submit(_encode_chunk, chunks[next_chunk]))
                next_chunk += 1
            yield from pending.popleft().result()


# ---------------------------------------------------------------- the write itself

def _remove_stale_partials(out: Path) -> None:
    """Partial files of writers that no longer run (killed ones) are useless; remove them."""
    for partial in out.parent.glob(f"{out.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            partial.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f"{path.name}.partial-{os.getpid()}")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_beton(src: str | os.PathLike, out: str | os.PathLike, *, max_side: int = 512, quality: int = 90,
                mode: str = "jpg", compress_probability: float = 0.5, workers: int | None = None,
                labels: str | os.PathLike | None = None, classes_file: str | os.PathLike | None = None,
                progress: bool = True, strict: bool = False) -> WriteSummary:
    """Write `src` to `out` (see the module docstring); raises WriteError on bad input.

    With `strict`, any skipped file raises StrictSkipError and nothing is written under `out`
    (the report of skips is still written): skips found while listing the files stop the write
    before any image is encoded, unreadable images once all are read.
    """
    if mode not in WRITE_MODES:
        raise WriteError(f"--mode {mode!r} is not valid; choose one of {', '.join(WRITE_MODES)}")
    if not 0 <= max_side <= 65535:
        raise WriteError(f"--max-side must be in 0..65535 (0 keeps the original size), got {max_side}")
    if not 1 <= quality <= 100:
        raise WriteError(f"--quality must be in 1..100, got {quality}")
    if not 0.0 <= compress_probability <= 1.0:
        raise WriteError(f"--compress-probability must be in [0, 1], got {compress_probability}")
    if (labels is None) != (classes_file is None):
        raise WriteError("--labels and --classes go together (a flat folder needs both; a class tree neither)")
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise WriteError(f"--workers must be >= 1, got {workers}")
    src, out = Path(src).expanduser(), Path(out).expanduser()
    if labels is not None:
        classes = read_classes(classes_file)
        samples, skipped = scan_labelled_folder(src, Path(labels), classes)
    else:
        classes, samples, skipped = scan_class_tree(src)
    if not out.parent.is_dir():
        raise WriteError(f"--out: the folder {out.parent} does not exist")
    report = Path(f"{out}{SKIPPED_SUFFIX}")
    if strict and skipped:
        _write_report(report, src, skipped)
        raise _strict_error(out, report, skipped, "before encoding any image")

    started = time.perf_counter()
    # FFCV (and numba, ~2 s) only once the arguments and the source have been checked
    from rkan_dist.data.ffcv_import import import_ffcv

    import_ffcv()
    from ffcv.fields import RGBImageField

    from rkan_dist.data.beton import BetonWriter, page_size_for

    image_field = RGBImageField(write_mode=mode, max_resolution=max_side or None, jpeg_quality=quality,
                                compress_probability=compress_probability)
    _remove_stale_partials(out)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    writer = BetonWriter(partial, image_field, capacity=len(samples), page_size=page_size_for(max_side))
    bar = tqdm(total=len(samples), unit="img", desc=f"writing {out.name}", disable=not progress, smoothing=0.1)
    try:
        results = _encoded_in_order([path for path, _ in samples], image_field, workers)
        for (path, label), result in zip(samples, results):
            bar.update(1)
            if result[0] == "skip":
                skipped.append(Skip(path, _kind_of(result[1]), result[1]))
                continue
            _, metadata, payload = result
            if not writer.fits(len(payload)):
                skipped.append(Skip(path, TOO_LARGE,
                                    f"encoded image ({len(payload)} bytes) is larger than a page; lower --max-side"))
                continue
            height, width = int(metadata["height"]), int(metadata["width"])
            if max_side == 0 and max(height, width) > 65535:
                skipped.append(Skip(path, TOO_LARGE, f"image is {width}x{height}; FFCV stores at most 65535 px a side"))
                continue
            writer.append(metadata, payload, label)
        bar.close()
        if strict and skipped:
            _write_report(report, src, skipped)
            raise _strict_error(out, report, skipped, "after reading every image")
        if writer.num_samples == 0:
            raise WriteError(f"no image in {src} could be written ({len(skipped)} files skipped, e.g. "
                             f"{skipped[0].path}: {skipped[0].reason})" if skipped else f"no image in {src}")
        size = writer.close()
        _atomic_write_text(classes_path(out), json.dumps(classes, indent=0) + "\n")
        relative = _write_report(report, src, skipped)
        os.replace(partial, out)  # the commit point: only now does the name exist
    except BaseException:
        bar.close()
        writer.abort()
        partial.unlink(missing_ok=True)
        raise
    return WriteSummary(out=out, written=writer.num_samples, skipped=relative, bytes=size,
                        seconds=time.perf_counter() - started, classes=classes, skip_counts=_skip_counts(skipped),
                        unknown_classes=dict(Counter(skip.label for skip in skipped if skip.kind == UNKNOWN_CLASS)))


def _skip_counts(skipped: list[Skip]) -> dict[str, int]:
    return dict(Counter(skip.kind for skip in skipped).most_common())


def _write_report(report: Path, src: Path, skipped: list[Skip]) -> list[tuple[str, str]]:
    """FILE.beton.skipped.txt, one 'path<TAB>reason' line per skipped file; returns those pairs."""
    relative = sorted((os.path.relpath(skip.path, src), skip.reason) for skip in skipped)
    if relative:
        _atomic_write_text(report, "".join(f"{path}\t{reason}\n" for path, reason in relative))
    else:
        report.unlink(missing_ok=True)  # a stale report from an earlier write would mislead
    return relative


def _strict_error(out: Path, report: Path, skipped: list[Skip], when: str) -> StrictSkipError:
    counts = "; ".join(f"{count} {kind}" for kind, count in _skip_counts(skipped).items())
    return StrictSkipError(f"--strict: {len(skipped)} file(s) would be skipped ({counts}); stopped {when}, nothing "
                           f"written to {out}; the files and their reasons are listed in {report}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkan-dist write", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--src", required=True, help="ImageFolder root (one sub-folder per class) or, with --labels, a flat folder")
    parser.add_argument("--out", required=True, help="the .beton file to write")
    parser.add_argument("--max-side", type=int, default=512, help="resize so the longer side is at most this (0 = keep)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality for jpg/proportion modes")
    parser.add_argument("--mode", default="jpg", choices=WRITE_MODES, help="store JPEG, raw pixels, or a mix")
    parser.add_argument("--compress-probability", type=float, default=0.5, help="share stored as JPEG in proportion mode")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPU cores)")
    parser.add_argument("--labels", default=None, help="labels CSV for a flat folder (ImageNet's LOC_val_solution.csv)")
    parser.add_argument("--classes", default=None, help="the train file's .classes.json, giving the class indices")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--strict", action="store_true",
                        help="any skipped file is an error: exit 1 and write nothing under --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the message
        return int(exit_.code or 0) and EXIT_USAGE
    try:
        summary = write_beton(args.src, args.out, max_side=args.max_side, quality=args.quality, mode=args.mode,
                              compress_probability=args.compress_probability, workers=args.workers,
                              labels=args.labels, classes_file=args.classes, progress=not args.quiet,
                              strict=args.strict)
    except StrictSkipError as err:
        print(f"rkan-dist write: error: {err}", file=sys.stderr)
        return 1
    except WriteError as err:
        print(f"rkan-dist write: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    print(summary.describe())
    if summary.unknown_classes:
        print(f"rkan-dist write: warning: {unknown_classes_warning(summary.unknown_classes, args.classes)}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
