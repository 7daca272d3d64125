"""FFCV's Loader with two of its internals replaced: the traversal order and the reader thread.

`PlannedOrder` stands in for the order a Loader builds from its OrderOption, so that a pass reads
exactly the sample ids we planned (see ffcv_loaders' docstring). `DeviceReaderLoader.__iter__` is
a copy of FFCV 1.0.2's `Loader.__iter__` that starts `DeviceEpochIterator` instead of FFCV's
EpochIterator. Neither the traversal_order attribute nor `__iter__`'s body is public API, so the
loader first checks that the installed FFCV is the release the copy was made from (`TESTED`; see
rkan_dist.upstream_versions).
"""

from __future__ import annotations

import numpy as np
import torch
from ffcv.loader import Loader
from ffcv.loader.epoch_iterator import EpochIterator
from ffcv.pipeline.compiler import Compiler
from ffcv.traversal_order.base import TraversalOrder

from rkan_dist.upstream_versions import TestedRelease, require

TESTED = TestedRelease("ffcv", "1.0.2", "Loader.__iter__ and the Loader's traversal order",
                       "rkan_dist/data/ffcv_loader_patch.py")


class PlannedOrder(TraversalOrder):
    """The traversal order FFCV asks for each epoch: the array we planned for it."""

    def __init__(self, loader: Loader):
        super().__init__(loader)
        self.planned = np.asarray(loader.indices, dtype=np.uint64)

    def sample_order(self, epoch: int) -> np.ndarray:
        return self.planned


class DeviceEpochIterator(EpochIterator):
    """FFCV's reader thread (one per pass), bound to the rank's GPU before it does any CUDA work.

    CUDA's current device is per thread, and a new thread starts on GPU 0 whatever the process
    chose with torch.cuda.set_device. The reader thread's stream switches and events then create
    a CUDA context on GPU 0 in every rank's process (~0.4 GB each on GPU 0; ffcv#210, and
    ffcv#190, which proposed this same set_device in the thread).
    """

    def __init__(self, loader: Loader, order, device: torch.device | None):
        self.reader_device = device  # before EpochIterator.__init__, which starts the thread
        super().__init__(loader, order)

    def run(self) -> None:
        if self.reader_device is not None:
            torch.cuda.set_device(self.reader_device)
        super().run()


class DeviceReaderLoader(Loader):
    """FFCV's Loader with its passes read by `DeviceEpochIterator` on `reader_device` (CUDA) or
    left alone (None), in the order of `planned_order`.

    The planned order replaces the loader's traversal order after construction: FFCV 1.0.2's
    Loader takes its own OrderOption values only (its check for a TraversalOrder class tests for
    an instance).
    """

    reader_device: torch.device | None = None

    def __init__(self, *args, **kwargs):
        require(TESTED)
        super().__init__(*args, **kwargs)
        self.planned_order = PlannedOrder(self)
        self.traversal_order = self.planned_order

    def __iter__(self) -> DeviceEpochIterator:
        # Loader.__iter__ of ffcv 1.0.2, with the iterator class swapped
        Compiler.set_num_threads(self.num_workers)
        order = self.next_traversal_order()
        selected_order = order[:len(self) * self.batch_size]
        self.next_epoch += 1
        if self.code is None or self.recompile:
            self.generate_code()
        return DeviceEpochIterator(self, selected_order, self.reader_device)
