"""A demo run on a CPU without native bf16 (forced through the capability probe) trains in fp32 and
says so; a last step that is also a checkpoint step is saved once."""

from __future__ import annotations

import json

import pytest
import yaml
from trainrun import DEMO, base_overrides

from rkan_dist import precision as precision_module
from rkan_dist.config import load_config

pytestmark = pytest.mark.integration


def _records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def test_auto_precision_on_an_avx2_cpu_is_fp32_and_the_run_says_so(monkeypatch, tmp_path, digits_cache, capfd):
    """(The bf16 side of the rule is unit-tested: tests/unit/test_precision_threads.py.)"""
    from rkan_dist.trainer import Trainer

    expected = "fp32"
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(precision_module, "cpu_capability", lambda: "AVX2")
    run_dir = tmp_path / "run"
    overrides = [o for o in base_overrides(run_dir, digits_cache, steps=4) if not o.startswith("train.precision")]
    # the demo's own setting, and a last step (4) that is also a periodic checkpoint step, mid-epoch
    config = load_config(DEMO, [*overrides, "checkpoint.every_steps=2", "logging.tensorboard=true"])
    assert config.train.precision == "auto"
    with Trainer(config) as trainer:
        result = trainer.train()
        assert trainer.engine.precision == expected
    assert result.status == "finished" and result.global_step == 4
    log = capfd.readouterr().err
    opening = next(line for line in log.splitlines() if "parameters" in line and "global batch" in line)
    assert "precision fp32 (auto: oneDNN has no native bf16 on this CPU (AVX2)" in opening, opening
    assert "will be slow" not in log
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["precision"] == expected  # the concrete precision, not `auto`
    assert (run_dir / "config.yaml").read_text().startswith(f"# train.precision: {expected} (auto: ")
    texts = _records(run_dir, "text")
    assert texts and texts[0]["run/precision"].startswith(f"{expected} (auto: ")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"tensors": 0})
    events.Reload()
    assert "run/precision/text_summary" in events.Tags()["tensors"]
    # one save per step: steps 2 and 4, the last one not written a second time at the end of the run
    assert [record["step"] for record in _records(run_dir, "checkpoint")] == [2, 4]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2", "step-4"]


def test_explicit_bf16_on_a_cpu_without_native_bf16_runs_but_warns_once(monkeypatch, tmp_path, digits_cache, capfd):
    from rkan_dist.trainer import Trainer

    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: False)
    run_dir = tmp_path / "run"
    overrides = [o for o in base_overrides(run_dir, digits_cache, steps=1) if not o.startswith("train.precision")]
    config = load_config(DEMO, [*overrides, "train.precision=bf16", "logging.tensorboard=false",
                                "checkpoint.at_epoch_end=false"])
    with Trainer(config) as trainer:
        trainer.train()
    log = capfd.readouterr().err
    assert log.count("will be slow") == 1, log
    assert "precision bf16 (set by train.precision)" in log
