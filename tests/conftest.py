"""Shared fixtures: the real small dataset every data-touching test uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
# CI selects tests by marker (`-m "unit or integration or slurm"`): a test module that forgot its
# pytestmark would silently never run (two did), so a test without one gets its folder's.
FOLDER_MARKS = {"unit": pytest.mark.unit, "integration": pytest.mark.integration}


def pytest_configure(config: pytest.Config) -> None:
    # what `make test-avx2` selects (the folder marks are listed in pyproject.toml)
    config.addinivalue_line(
        "markers", "numerics: compares the floating-point results of two code paths, so its tolerance depends on "
        "the CPU's kernels; `make test-avx2` runs these again with AVX2 kernels only")


def pytest_report_header(config: pytest.Config) -> str:
    """Which kernels this run's numbers come from (AVX512 or, under `make test-avx2`, AVX2)."""
    import torch

    return f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()}"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        folder = Path(str(item.path)).resolve().relative_to(TESTS_DIR).parts[0]
        own = {mark.name for mark in item.iter_markers()} & {"unit", "integration", "slurm"}
        if folder in FOLDER_MARKS and not own:
            item.add_marker(FOLDER_MARKS[folder])


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """A cache folder holding the digits files, for `data.cache_dir=` in training runs."""
    from rkan_dist.data.demo import ensure_digits

    cache = tmp_path_factory.mktemp("digits-cache")
    ensure_digits(cache)
    return cache


@pytest.fixture(scope="session")
def digits_data(digits_cache):
    """rkan_dist.data.demo.DigitsPaths of the scikit-learn digits (32 px RGB, 1,437 train / 360 val),
    written once per test session into a temporary cache: train_beton, val_beton (raw pixels),
    train_dir, val_dir (ImageFolder trees of JPEGs), classes ('0'..'9')."""
    from rkan_dist.data.demo import ensure_digits

    return ensure_digits(digits_cache)


@pytest.fixture(autouse=True)
def root_logging_restored():
    """Trainers and CLI mains run in-process call setup_logging, which replaces the root handler;
    put the previous handlers and level back so that no test's logging set-up outlives it."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True)
def garbage_collected_after_integration_tests(request):
    """Run the finalizers of an integration test's garbage at its end (~0.1 s), not at a random
    allocation in a later test: FFCV's numba dispatchers raise in theirs, and a collection that
    lands inside an ast.parse (Triton, dynamo's guards) then fails that parse on CPython 3.11."""
    yield
    if request.node.get_closest_marker("integration"):
        import gc

        gc.collect()


@pytest.fixture(autouse=True)
def no_slurm_controller(request, monkeypatch):
    """Outside tests/slurm no Slurm controller is reachable, whichever one SLURM_CONF named when pytest
    started or the slurm tier's cluster (its session fixture sets SLURM_CONF, and tests/slurm runs
    before tests/unit). An empty configuration makes every Slurm client fail at once; a missing
    file would make each retry for 60 s."""
    if request.node.get_closest_marker("slurm") is None:
        monkeypatch.setenv("SLURM_CONF", os.devnull)
