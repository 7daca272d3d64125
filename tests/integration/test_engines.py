"""Engines and process groups with real processes: torchrun + gloo, real DeepSpeed, submitit's local executor.

The heavy lifting runs in tests/integration/scripts/engine_checks.py under one torchrun launch per
fixture (DeepSpeed's start-up is paid once); the tests here assert on what it measured.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rkan_dist import distributed, parallel
from rkan_dist.config import ParallelConfig

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).parent / "scripts"
sys.path.insert(0, str(SCRIPTS))
import engine_checks  # noqa: E402


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # a clean launch
        env.pop(name, None)
    return env


def _torchrun(out: Path, *checks: str, timeout: int = 240) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPTS / "engine_checks.py"), str(out), *checks]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())
    if result.returncode != 0:
        pytest.fail(f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")


def _read(out: Path, check: str) -> dict:
    return json.loads((out / f"{check}.json").read_text())


@pytest.fixture(scope="module")
def training_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine_training")
    _torchrun(out, "helpers", "curves", "accum", "overlap")
    return out


@pytest.fixture(scope="module")
def state_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engine_state")
    _torchrun(out, "checkpoint", "nan_skip", "cuda_reductions")
    return out


# ----------------------------------------------------------------------------- process group

@pytest.mark.timeout(300)
def test_torchrun_process_group_and_helpers(training_runs):
    ranks = [json.loads((training_runs / f"helpers_rank{r}.json").read_text()) for r in range(2)]
    for rank, info in enumerate(ranks):
        assert (info["rank"], info["world_size"], info["local_rank"]) == (rank, 2, rank)
        assert info["backend"] == "gloo" and info["device"] == "cpu"
        assert info["is_main"] == (rank == 0)
        assert info["idempotent"], "a second init() must join the existing group and describe it the same"
        assert info["sum"] == 3.0  # 1 + 2
        assert info["flag_any"] is True and info["flag_none"] is False
        assert info["broadcast"] == {"from": 0}


# ----------------------------------------------------------------------------- training equivalence

@pytest.mark.timeout(300)
@pytest.mark.numerics
def test_ddp_and_zero_stages_follow_the_same_fp32_loss_curve(training_runs):
    curves = _read(training_runs, "curves")["curves"]
    reference = curves["ddp_fp32"]
    assert len(reference) == 12
    for name in ("zero0_fp32", "zero1_fp32", "zero2_fp32"):
        assert curves[name] == pytest.approx(reference, abs=1e-4), name
        # the pre-clipping norm each engine reports (ZeRO's is summed over partitions, in fp32 on gloo)
        assert curves[name + "_grad_norms"] == pytest.approx(curves["ddp_fp32_grad_norms"], rel=1e-4), name


@pytest.mark.timeout(300)
def test_loss_falls_for_every_backend_and_precision(training_runs):
    curves = _read(training_runs, "curves")["curves"]
    for name in ("ddp_fp32", "zero0_fp32", "zero1_fp32", "zero2_fp32", "ddp_bf16", "zero0_bf16", "zero1_bf16",
                 "zero2_bf16"):
        losses = curves[name]
        assert all(torch.isfinite(torch.tensor(losses))), name
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, f"{name}: loss did not fall: {losses}"


@pytest.mark.timeout(300)
@pytest.mark.numerics
def test_bf16_tracks_fp32_and_keeps_batchnorm_and_export_in_fp32(training_runs):
    result = _read(training_runs, "curves")
    curves, bn_dtypes = result["curves"], result["bn_dtypes"]
    for name in ("ddp_bf16", "zero0_bf16", "zero1_bf16", "zero2_bf16"):
        assert curves[name] == pytest.approx(curves["ddp_fp32"], abs=0.03), name
        assert bn_dtypes[name][1] == "torch.float32", f"{name}: BatchNorm running stats must stay fp32"
        assert curves[name + "_export_dtypes"] == ["torch.float32", "torch.int64"], name
    assert bn_dtypes["zero2_bf16"][0] == "torch.bfloat16"  # DeepSpeed really runs the module in bf16


@pytest.mark.timeout(300)
@pytest.mark.numerics
def test_zero_reductions_overlapped_over_gloo_give_the_blocking_paths_weights(training_runs):
    result = _read(training_runs, "overlap")
    for name, run in result.items():
        assert run["identical"], f"{name}: overlapped reductions changed the weights"
        # one epilogue per backward (4 steps x micro-batches), each finding several reductions in flight
        assert len(run["in_flight_at_epilogue"]) == 4 * (2 if name.endswith("accum2") else 1), name
        assert min(run["in_flight_at_epilogue"]) >= 3, (name, run["in_flight_at_epilogue"])


@pytest.mark.numerics
def test_two_half_batches_accumulated_equal_one_full_batch(training_runs):
    result = _read(training_runs, "accum")
    for name in ("ddp", "zero0", "zero2"):
        assert result[name]["half"] == pytest.approx(result[name]["full"], abs=1e-5), name
        assert result[name]["max_weight_diff"] < 1e-5, name
    assert result["applied"] == [False, True]
    # No all-reduce inside the window (ranks hold different grads), one at its end (identical grads).
    assert result["rank_grad_spread"][0] > 1e-3
    assert result["rank_grad_spread"][1] == 0.0


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.timeout(300)
@pytest.mark.numerics
def test_save_and_load_state_restores_weights_and_optimizer_exactly(state_runs):
    result = _read(state_runs, "checkpoint")
    for name in ("ddp", "zero0", "zero1_bf16", "zero2_bf16"):
        run = result[name]
        assert run["client_state"] == {"step": 3, "note": name}
        assert run["before_load_diff"] > 0, "the fresh engine must start from different weights"
        assert run["loaded_diff"] == 0.0, name
        assert run["resumed"] == run["continued"], f"{name}: training after load diverged"
        assert run["final_diff"] == 0.0, name
    assert result["ddp"]["momentum_equal_after_resume"]
    assert sorted(p.name for p in (state_runs / "ckpt_ddp").iterdir()) == [
        "client_state.pt", "model.pt", "optimizer.pt", "scaler.pt"]
    assert (state_runs / "ckpt_zero2_bf16" / "engine").is_dir()


@pytest.mark.timeout(300)
def test_ddp_state_saved_by_two_ranks_loads_in_one_process(state_runs):
    for name in ("model.pt", "optimizer.pt", "scaler.pt", "client_state.pt"):  # plain tensors and types only
        torch.load(state_runs / "ckpt_ddp" / name, weights_only=True)
    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"), None, True)
    engine = engine_checks.make_engine(info, "ddp", seed=99)
    client_state = engine.load_state(state_runs / "ckpt_ddp")
    assert client_state == {"step": 3, "note": "ddp"}
    saved = torch.load(state_runs / "ckpt_ddp_weights.pt", weights_only=True)
    loaded = engine.consolidated_state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert engine.optimizer.state_dict()["state"], "optimizer momentum must be restored too"


@pytest.mark.timeout(300)
def test_loading_the_other_backends_checkpoint_says_which_backend(state_runs):
    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"), None, True)
    engine = engine_checks.make_engine(info, "ddp")
    with pytest.raises(ValueError, match="parallel.backend=deepspeed"):
        engine.load_state(state_runs / "ckpt_zero0")


@pytest.mark.timeout(300)
@pytest.mark.numerics
def test_non_finite_loss_on_one_rank_drops_the_window_on_every_rank(state_runs):
    result = _read(state_runs, "nan_skip")
    for name in ("ddp_accum2", "ddp_accum1", "zero0", "zero1_fp32", "zero2_fp32", "zero2_bf16"):
        assert result[name]["weight_diff"] < 1e-6, f"{name}: the dropped window leaked into the next step"


@pytest.mark.timeout(300)
@pytest.mark.numerics
def test_deepspeeds_cuda_reduction_path_over_gloo_trains_like_ddp_and_skips_non_finite_windows(state_runs):
    """contiguous_gradients=True, DeepSpeed's own overlapped reductions: what ZeRO runs on CUDA."""
    result = _read(state_runs, "cuda_reductions")
    for name in ("zero1_fp32", "zero2_fp32", "zero2_fp32_accum2"):
        run = result[name]
        assert (run["contiguous_gradients"], run["overlap_comm"], run["gloo_reductions"]) == (True, True, False), name
        reference = result["ddp_fp32_accum2" if name.endswith("accum2") else "ddp_fp32"]
        assert run["losses"] == pytest.approx(reference, abs=1e-4), name
        assert run["fp16_input_diff"] == 0.0, f"{name}: fp16 images must be cast to fp32"
    for name in ("ddp", "zero0", "zero1"):  # a channels_last model trains like the NCHW one
        assert result[f"channels_last_{name}"] == pytest.approx(result["ddp_fp32"][:3], abs=1e-4), name
    for name, skip in result["nan_skip"].items():
        assert skip["weight_diff"] < 1e-6, f"{name}: the dropped window leaked into the next step"


# ----------------------------------------------------------------------------- single process, DeepSpeed

@pytest.mark.timeout(300)
def test_deepspeed_in_one_process_without_launcher(tmp_path):
    """No torchrun: DeepSpeed still gets a (one-process) group, and bf16 on CPU works."""
    code = f"""
import sys, json, torch, torch.nn.functional as F
sys.path.insert(0, {str(SCRIPTS)!r})
import engine_checks as ec
from rkan_dist import distributed
info = distributed.init("cpu")
assert info.backend is None and info.world_size == 1
engine = ec.make_engine(info, "deepspeed", 1, "bf16")
losses = ec.train(engine, info, steps=3)
distributed.shutdown(); distributed.shutdown()
print(json.dumps(losses))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, env=_env(),
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    losses = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.timeout(120)
def test_deepspeed_refuses_fp16_on_cpu():
    info = distributed.DistInfo(0, 1, 0, torch.device("cpu"), None, True)
    model = engine_checks.TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        parallel.wrap(model, optimizer, parallel_config=ParallelConfig(backend="deepspeed"), precision="fp16",
                      grad_accum=1, grad_clip=0.0, device=info.device, dist_info=info, micro_batch_size=8)


# ----------------------------------------------------------------------------- other launchers

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_torchrun_nodes_with_c10d_rendezvous_train_as_one_job(tmp_path):
    port = _free_port()
    launches = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                          "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                          "--rdzv-id", "rkan-two-nodes", str(SCRIPTS / "multinode_train.py"), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        for node in (0, 1)]
    outputs = []
    try:
        for launch in launches:
            outputs.append(launch.communicate(timeout=180)[0])
    finally:
        for launch in launches:
            if launch.poll() is None:
                launch.kill()
    assert all(launch.returncode == 0 for launch in launches), "\n".join(o[-3000:] for o in outputs)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert [r["world_size"] for r in results] == [2, 2]
    first, second = results[0]["final"], results[1]["final"]
    # Parameters, not BatchNorm running stats: DDP syncs those from rank 0 at the start of each
    # forward, so after the last forward each rank holds the stats of its own batch.
    parameter_names = [k for k in first if "running_" not in k and "num_batches" not in k]
    assert len(parameter_names) >= 6
    assert all(torch.equal(first[k], second[k]) for k in parameter_names), "the two nodes ended with different weights"
    assert any(not torch.equal(first[k], results[0]["initial"][k]) for k in first), "nothing was trained"


@pytest.mark.timeout(180)
def test_submitit_local_executor_tasks_form_one_group(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SCRIPTS), os.environ.get("PYTHONPATH", "")]))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    import submitit_task

    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(tasks_per_node=2, nodes=1, timeout_min=3)
    job = executor.submit(submitit_task.join_and_reduce)
    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["launcher"] == "submitit" and r["world_size"] == 2 and r["backend"] == "gloo"
        assert r["sum"] == 3.0
        assert 15000 <= r["master_port"] < 35000
