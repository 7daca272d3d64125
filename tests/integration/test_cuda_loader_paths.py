"""The CUDA loader path on CPU: the GPU pipeline's fp16 batches (forced onto the CPU) through the
fp32 engines and evaluation, and FFCV's reader thread bound to the rank's device."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from rkan_dist.data import ffcv_loader_patch, ffcv_loaders
from rkan_dist.distributed import DistInfo
from rkan_dist.evaluate import evaluate_loader, forward_in_precision

pytestmark = pytest.mark.integration

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def val_loader(digits_data) -> ffcv_loaders.FFCVValLoader:
    return ffcv_loaders.FFCVValLoader(str(digits_data.val_beton), batch_size=64, num_workers=1, os_cache=False, rank=0,
                                      world_size=1, device=torch.device("cpu"), channels_last=False, val_res=32,
                                      crop_ratio=1.0, mean=MEAN, std=STD, classes=list(digits_data.classes))


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10)).eval()


def test_fp32_training_and_evaluation_take_the_cuda_loaders_fp16_images(digits_data, monkeypatch):
    from rkan_dist.config import ParallelConfig
    from rkan_dist.parallel import wrap

    monkeypatch.setattr(ffcv_loaders, "pipeline_on_device", lambda device: True)  # the GPU pipeline, on CPU
    loader = val_loader(digits_data)
    images, labels = next(iter(loader))
    assert images.dtype == torch.float16, "the CUDA pipeline normalises in fp16"
    model = tiny_model()
    with pytest.raises(RuntimeError, match="should be the same"):  # what fp32 runs on CUDA met
        model(images)
    expected = model(images.float())

    info = DistInfo(0, 1, 0, torch.device("cpu"), None, True)
    engine = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), parallel_config=ParallelConfig(backend="ddp"),
                  precision="fp32", grad_accum=1, grad_clip=0.0, device=info.device, dist_info=info)
    engine.eval()
    with torch.no_grad():
        assert torch.equal(engine.forward(images), expected)
    # `rkan-dist eval` and the trainer's EMA evaluation run the module through forward_in_precision
    result = evaluate_loader(forward_in_precision(model, "fp32", info.device), loader, info.device)
    assert result["samples"] == loader.num_samples == 360
    assert 0.0 <= result["top1"] <= 1.0 and result["loss"] > 0


def test_ffcvs_reader_thread_runs_on_the_ranks_gpu(digits_data, monkeypatch):
    """A new thread starts on GPU 0; the reader thread must set the rank's device itself."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append((threading.current_thread(), device)))
    loader = val_loader(digits_data)
    assert loader.loader.reader_device is None  # a CPU loader leaves CUDA alone
    for _ in loader:
        pass
    assert calls == []
    loader.loader.reader_device = torch.device("cuda", 3)  # what a CUDA loader of local rank 3 sets
    batches = sum(1 for _ in loader)
    assert batches == len(loader) == 6
    assert len(calls) == 1, calls
    thread, device = calls[0]
    assert device == torch.device("cuda", 3)
    assert thread is not threading.main_thread() and isinstance(thread, ffcv_loader_patch.DeviceEpochIterator)
