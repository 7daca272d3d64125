"""The README tour's step 4 on the dev cluster: after step 1's writes, the submit command as written
(plus the local cluster's resources and a short run appended) trains on the same files, and
step 5's resume continues from the job's checkpoint with the same data paths."""

from __future__ import annotations

import json

import pytest
from readme_tour import localize, make_imagenet_tree, run, scaled, tour_steps, workspace

pytestmark = pytest.mark.timeout(600)


def test_readme_tour_submit_then_resume(slurm, tmp_path) -> None:
    steps = tour_steps()
    make_imagenet_tree(tmp_path)
    work = workspace(tmp_path)
    run_dir = work / "runs" / "imagenet" / "rkan_resnet50"
    for command in steps[1]:
        run(scaled(localize(command, tmp_path), max_steps=0), work)

    (submit,) = steps[4]
    submitted = run(scaled(localize(submit, tmp_path), max_steps=2), work, timeout=120)
    job_id = int(submitted.stdout.split("submitted job ")[1].split()[0])
    slurm.submitted.append(job_id)
    assert str(run_dir) in submitted.stdout
    record = slurm.wait_for(job_id, "COMPLETED", timeout=400)
    assert record["NumNodes"] == "2" and record["ExitCode"] == "0:0"
    assert (run_dir / "checkpoints" / "step-2" / "manifest.json").is_file()
    config = json.loads((run_dir / "checkpoints" / "step-2" / "manifest.json").read_text())["config"]
    assert config["data"]["train_path"] == f"{tmp_path}/datasets/imagenet/train_500_0.50_90.beton"

    (resume,) = steps[5]
    resumed = run(scaled(localize(resume, tmp_path), max_steps=3), work)
    assert "resumed from" in resumed.stdout + resumed.stderr and "step-2" in resumed.stdout + resumed.stderr
    assert (run_dir / "checkpoints" / "step-3" / "manifest.json").is_file()
