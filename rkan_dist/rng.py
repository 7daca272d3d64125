"""Seeding, and each process's RNG states as checkpoint data (Python, NumPy, torch, this process's GPU)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain types (weights_only-loadable)."""
    numpy_state = np.random.get_state()
    state = {
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [torch.from_numpy(numpy_state[1].astype(np.int64)), int(numpy_state[2]),
                  int(numpy_state[3]), float(numpy_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This process's GPU only: with one GPU per process the others belong to other ranks, and a
        # run resumed on a node that shows fewer GPUs (one per task) must still load it.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    keys, version, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    keys_np, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys_np.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_state = state["cuda"]
        if isinstance(cuda_state, list | tuple):  # checkpoints that hold every GPU the process saw
            index = torch.cuda.current_device()
            cuda_state = cuda_state[index] if index < len(cuda_state) else None
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)
