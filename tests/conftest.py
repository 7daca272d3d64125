"""Shared fixtures: the real small dataset every data-touching test uses."""

from __future__ import annotations

import pytest


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
