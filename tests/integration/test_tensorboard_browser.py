"""TensorBoard as a user sees it: a real `tensorboard` server on a short demo run, opened in headless
Chromium; the scalar cards for train loss, eval top-1 and the RKAN branch ratio must render."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from trainrun import base_overrides, free_port, run_train

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXPECTED_TAGS = ("train/loss", "eval/top1", "rkan/layer4/branch_ratio")


@pytest.fixture(scope="module")
def tensorboard_url(tmp_path_factory, digits_cache):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (make test installs it)")
        pytest.skip("chromium is not installed")
    run_dir = tmp_path_factory.mktemp("tb") / "run"
    run_train(1, base_overrides(run_dir, digits_cache, steps=6))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir / "tb"),
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:  # ready once the server lists the run's scalar tags
            try:
                with urllib.request.urlopen(f"{url}/data/plugin/scalars/tags", timeout=5) as response:
                    if b"train/loss" in response.read():
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "tensorboard did not come up"
            assert server.poll() is None, "tensorboard exited"
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def chromium(url: str, profile: Path, *args: str, budget_ms: int = 20000) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
         f"--virtual-time-budget={budget_ms}", "--window-size=1400,900", *args, url],
        capture_output=True, text=True, timeout=240)


def test_scalar_cards_render_in_chromium(tensorboard_url, tmp_path):
    # The time-series dashboard filtered to our tags: one card per tag, titled with the tag.
    page = f"{tensorboard_url}/?tagFilter=train%2Floss%7Ceval%2Ftop1%7Cbranch_ratio#timeseries"
    for attempt, budget_ms in enumerate((20000, 45000, 90000)):  # a loaded machine renders slowly
        result = chromium(page, tmp_path / f"profile{attempt}", "--dump-dom", budget_ms=budget_ms)
        assert result.returncode == 0, result.stderr[-2000:]
        card_titles = set(re.findall(r'<tb-truncated-path[^>]*title="([^"]+)"', result.stdout))
        if set(EXPECTED_TAGS) <= card_titles:
            break
    assert set(EXPECTED_TAGS) <= card_titles, card_titles
    assert "train/lr" not in card_titles  # the filter applied: the page is the rendered dashboard

    screenshot = tmp_path / "tensorboard.png"
    result = chromium(page, tmp_path / "profile-shot", f"--screenshot={screenshot}")
    assert screenshot.is_file() and screenshot.stat().st_size > 20_000, result.stderr[-2000:]
