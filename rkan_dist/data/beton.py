""".beton files: a deterministic single-stream writer and a checker with clear errors.

Why not ffcv.writer.DatasetWriter: its worker processes book pages from a shared counter, so
which sample lands on which page depends on process timing and two writes of the same tree
differ; its 'proportion' mode draws from an unseeded RNG; it needs the sample count before
the first image is decoded (we learn which files are bad only while decoding); and an exception
in a worker can hang it. Here the expensive part (decode, resize, JPEG encode) runs in parallel
elsewhere (`write.py`), in a fixed order, and this class lays the results out exactly as FFCV's
format expects: header, field descriptors, per-sample metadata, page-aligned data pages, and the
allocation table at the end. The file is read back by FFCV's own Reader/Loader (the tests do).

Layout notes: the metadata region is reserved for every candidate file; only the first
`num_samples` records are read, so the slack left by skipped files is harmless zeros.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from ffcv.fields import IntField, RGBImageField
from ffcv.types import (
    ALLOC_TABLE_TYPE,
    CURRENT_VERSION,
    TYPE_ID_HANDLER,
    FieldDescType,
    HeaderType,
    get_metadata_type,
)
from ffcv.utils import align_to_page

IMAGE_FIELD = "image"
LABEL_FIELD = "label"
DEFAULT_PAGE_SIZE = 1 << 23  # 8 MiB, FFCV's default


class BetonError(ValueError):
    """A .beton file is missing, truncated or not what the loaders expect."""


def page_size_for(max_side: int) -> int:
    """Smallest power of two >= 8 MiB that holds one raw max_side x max_side RGB image."""
    largest = max_side * max_side * 3 if max_side > 0 else 1 << 26
    size = DEFAULT_PAGE_SIZE
    while size < largest:
        size <<= 1
    return size


class BetonWriter:
    """Appends (image, label) samples in order; `close()` writes metadata, table and header."""

    def __init__(self, path: str | os.PathLike, image_field: RGBImageField, capacity: int,
                 page_size: int = DEFAULT_PAGE_SIZE):
        self.path = Path(path)
        self.fields = {IMAGE_FIELD: image_field, LABEL_FIELD: IntField()}
        self.metadata_type = get_metadata_type(list(self.fields.values()))
        self.page_size = page_size
        self.metadata = np.zeros(max(capacity, 1), dtype=self.metadata_type)
        self.allocations: list[tuple[int, int, int]] = []
        self.num_samples = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()/abort()
        descriptors = self._field_descriptors()
        self._file.write(np.zeros(1, dtype=HeaderType).tobytes())  # real header written last
        self._file.write(descriptors.tobytes())
        self.metadata_start = HeaderType.itemsize + descriptors.nbytes
        self.data_start = align_to_page(self.metadata_start + self.metadata.nbytes, page_size)
        self._page = np.zeros(page_size, dtype=np.uint8)
        self._page_index = -1
        self._page_used = page_size  # "full": the first append opens page 0

    def _field_descriptors(self) -> np.ndarray:
        type_ids = {handler: type_id for type_id, handler in TYPE_ID_HANDLER.items()}
        descriptors = np.zeros(len(self.fields), dtype=FieldDescType)
        for position, (name, field) in enumerate(self.fields.items()):
            encoded = np.frombuffer(name.encode("ascii"), dtype="<u1")
            descriptors[position]["type_id"] = type_ids[type(field)]
            descriptors[position]["name"][: len(encoded)] = encoded
            descriptors[position]["arguments"][:] = field.to_binary()[0]
        return descriptors

    def fits(self, payload_size: int) -> bool:
        return payload_size <= self.page_size

    def append(self, image_metadata: np.ndarray, payload: bytes | np.ndarray, label: int) -> None:
        """image_metadata: one record of RGBImageField.metadata_type (mode, width, height)."""
        size = len(payload)
        if not self.fits(size):
            raise ValueError(f"payload of {size} bytes does not fit a page of {self.page_size}")
        if self.num_samples >= len(self.metadata):
            raise ValueError(f"more samples than the capacity {len(self.metadata)} given at creation")
        if size > self.page_size - self._page_used:
            self._flush_page()
            self._page_index += 1
            self._page_used = 0
            self._page.fill(0)
        pointer = self.data_start + self._page_index * self.page_size + self._page_used
        self._page[self._page_used:self._page_used + size] = np.frombuffer(payload, dtype=np.uint8)
        self._page_used += size
        images, labels = self.metadata["f0"], self.metadata["f1"]  # get_metadata_type's names
        for key in ("mode", "width", "height"):
            images[key][self.num_samples] = image_metadata[key]
        images["data_ptr"][self.num_samples] = pointer
        labels[self.num_samples] = label
        self.allocations.append((self.num_samples, pointer, size))
        self.num_samples += 1

    def _flush_page(self) -> None:
        if self._page_index < 0:
            return
        self._file.seek(self.data_start + self._page_index * self.page_size)
        self._file.write(self._page.tobytes())

    def close(self) -> int:
        """Finish the file; returns its size in bytes."""
        self._flush_page()
        end_of_data = self.data_start + (self._page_index + 1) * self.page_size
        if self._page_index < 0:
            end_of_data = self.data_start
        self._file.seek(0, os.SEEK_END)
        if self._file.tell() < end_of_data:  # only when no page was written
            self._file.write(b"\0" * (end_of_data - self._file.tell()))
        self._file.seek(end_of_data)
        table = np.array(self.allocations, dtype=ALLOC_TABLE_TYPE)
        self._file.write(table.tobytes())
        self._file.seek(self.metadata_start)
        self._file.write(self.metadata[: self.num_samples].tobytes())
        header = np.zeros(1, dtype=HeaderType)
        header[0]["version"] = CURRENT_VERSION
        header[0]["num_fields"] = len(self.fields)
        header[0]["page_size"] = self.page_size
        header[0]["num_samples"] = self.num_samples
        header[0]["alloc_table_ptr"] = end_of_data
        self._file.seek(0)
        self._file.write(header.tobytes())
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return end_of_data + table.nbytes

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


def check_beton(path: str | os.PathLike, what: str = "dataset") -> int:
    """Raise BetonError naming the problem unless `path` is a complete .beton with an RGB
    'image' field and an int 'label' field; returns the number of samples."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise BetonError(f"{what}: no such .beton file: {path}")
    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise BetonError(f"{what}: {path} is truncated ({size} bytes, smaller than the FFCV header)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise BetonError(f"{what}: {path} is not an FFCV .beton file (format version {int(header['version'])}, "
                         f"expected {CURRENT_VERSION})")
    num_fields, num_samples = int(header["num_fields"]), int(header["num_samples"])
    table_start = int(header["alloc_table_ptr"])
    descriptors_end = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if table_start == 0 or table_start > size or descriptors_end > size:
        raise BetonError(f"{what}: {path} is truncated or was never finished (allocation table at {table_start}, "
                         f"file size {size})")
    descriptors = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    names = [bytes(d["name"]).split(b"\0")[0].decode("ascii", "replace") for d in descriptors]
    kinds = {name: TYPE_ID_HANDLER.get(int(d["type_id"])) for name, d in zip(names, descriptors)}
    expected = {IMAGE_FIELD: RGBImageField, LABEL_FIELD: IntField}
    for name, kind in expected.items():
        if kinds.get(name) is not kind:
            found = ", ".join(f"{n} ({k.__name__ if k else 'custom'})" for n, k in kinds.items())
            raise BetonError(f"{what}: {path} has the wrong fields: need '{IMAGE_FIELD}' (RGBImageField) and "
                             f"'{LABEL_FIELD}' (IntField), found: {found or 'none'}")
    table_bytes = size - table_start
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_start)
    if table_bytes % ALLOC_TABLE_TYPE.itemsize or len(table) < num_samples:
        raise BetonError(f"{what}: {path} is truncated (allocation table holds {len(table)} of {num_samples} entries)")
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_start:
        raise BetonError(f"{what}: {path} is corrupt (image data points past the end of the data region)")
    return num_samples


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """The label of every sample, straight from the metadata (no image decoding)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    return np.asarray(reader.metadata[f"f{list(reader.handlers).index(LABEL_FIELD)}"], dtype=np.int64)
