"""FFCV decoder whose random crop and flip are a function of (seed, epoch, sample id).

FFCV's RandomResizedCropRGBImageDecoder and RandomHorizontalFlip draw from numba's per-thread
generators, so the pixels of a batch depend on thread scheduling and on how many batches came
before: a run resumed mid-epoch would see other crops than the uninterrupted run. This decoder
instead keys counter-based random numbers (`sampling.train_augmentation`) by
(seed, epoch, sample id). The epoch changes between epochs while the pipeline is compiled once:
numba freezes globals and closure values at compile time, so the decoder keeps the epoch in a
one-element array and the compiled code reads it through the array's address at run time.
"""

from __future__ import annotations

import math

import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
from numba import types
from numba.extending import intrinsic

from rkan_dist.data.sampling import random_crop_box, train_augmentation


@intrinsic
def _load_int64(typing_context, address):
    """*(int64 *)address - how compiled code sees a value that Python changes later."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, signature, arguments):
        pointer_type = context.get_value_type(types.CPointer(types.int64))
        return builder.load(builder.inttoptr(arguments[0], pointer_type))

    return types.int64(types.uintp), codegen


class SeededRandomResizedCropDecoder(ResizedCropRGBImageDecoder):
    """Random-resized-crop + optional horizontal flip, reproducible per (seed, epoch, sample).

    Set `epoch` before each epoch; `output_size` may change between epochs (progressive
    resizing) without recompiling, since buffers are re-allocated per epoch and the compiled
    code reads the output size from its destination buffer.
    """

    def __init__(self, output_size: tuple[int, int], seed: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                 flip: bool = True):
        super().__init__(output_size)
        self.seed = int(seed)
        self.scale = scale
        self.ratio = ratio
        self.flip = flip
        self._epoch_cell = np.zeros(1, dtype=np.int64)

    @property
    def epoch(self) -> int:
        return int(self._epoch_cell[0])

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch_cell[0] = value

    @property
    def get_crop_generator(self):  # required by the base class; this decoder crops by key instead
        return random_crop_box

    def generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        memory_read = self.memory_read
        loop = Compiler.get_iterator()
        imdecode_compiled = Compiler.compile(imdecode)
        resize_crop_compiled = Compiler.compile(resize_crop)
        seed = np.uint64(self.seed)
        epoch_address = self._epoch_cell.ctypes.data
        scale_min, scale_max = float(self.scale[0]), float(self.scale[1])
        log_ratio_min, log_ratio_max = math.log(self.ratio[0]), math.log(self.ratio[1])
        flip = bool(self.flip)

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temporary_storage = my_storage
            epoch = _load_int64(epoch_address)
            for position in loop(len(batch_indices)):
                sample_id = batch_indices[position]
                record = metadata[sample_id]
                image_data = memory_read(record["data_ptr"], storage_state)
                height = np.uint32(record["height"])
                width = np.uint32(record["width"])
                if record["mode"] == jpg:
                    buffer = temporary_storage[position]
                    imdecode_compiled(image_data, buffer, height, width, height, width, 0, 0, 1, 1, False, False)
                    buffer = buffer.reshape(-1)[: 3 * height * width].reshape(height, width, 3)
                else:
                    buffer = image_data.reshape(height, width, 3)
                top, left, crop_h, crop_w, flip_this = train_augmentation(
                    seed, epoch, sample_id, height, width, scale_min, scale_max, log_ratio_min, log_ratio_max, flip)
                output = destination[position]
                resize_crop_compiled(buffer, top, top + crop_h, left, left + crop_w, output)
                if flip_this:
                    out_width = output.shape[1]
                    for row in range(output.shape[0]):
                        for column in range(out_width // 2):
                            mirror = out_width - 1 - column
                            for channel in range(3):
                                pixel = output[row, column, channel]
                                output[row, column, channel] = output[row, mirror, channel]
                                output[row, mirror, channel] = pixel
            return destination[: len(batch_indices)]

        decode.is_parallel = True
        return decode
