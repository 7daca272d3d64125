"""Bad nodes: which node a failure points to, which nodes a restarting job leaves behind, and how a
job that may shrink is submitted (rkan_dist.nodes, rkan_dist.eviction, rkan_dist.submit)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rkan_dist import after_srun, submit
from rkan_dist.config import ConfigError, load_config
from rkan_dist.eviction import EvictionPolicy, excluded_by_run, nodes_to_evict, room_to_evict, unrecorded_end
from rkan_dist.ledger import EventLedger
from rkan_dist.nodes import join_nodes, node_of_rank, tasks_per_node_counts, this_node
from rkan_dist.slurm_cluster import SubmitError

pytestmark = pytest.mark.unit

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
JOB = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "4(x2),2", "SLURMD_NODENAME": "n1"}


@pytest.mark.parametrize(("text", "counts"), [("2", [2]), ("4(x2),2", [4, 4, 2]), ("1(x3)", [1, 1, 1])])
def test_tasks_per_node_reads_slurms_compressed_counts(text, counts) -> None:
    assert tasks_per_node_counts(text) == counts


def test_a_rank_is_placed_by_srun_block_distribution() -> None:
    assert [node_of_rank(rank, JOB) for rank in (0, 3, 4, 7, 8, 9)] == ["n1", "n1", "n2", "n2", "n3", "n3"]
    step = {**JOB, "SLURM_TASKS_PER_NODE": "1(x3)", "SLURM_STEP_TASKS_PER_NODE": "4(x2),2"}  # srun's own placement
    assert node_of_rank(4, step) == "n2"
    assert node_of_rank(10, JOB) is None  # past the job's tasks: unknown, not a guess
    assert node_of_rank(None, JOB) is None
    assert node_of_rank(2, {}) == this_node()  # outside Slurm every rank runs here


def test_this_node_is_slurms_name_for_it() -> None:
    assert this_node({"SLURMD_NODENAME": "n2"}) == "n2"  # logical nodes of one host differ


def test_node_lists_are_joined_sorted_without_repeats() -> None:
    assert join_nodes(["n10", "n2", "n2", "", "n1"]) == "n1,n2,n10"


def failure(node: str, kind: str = "crash", rank: int = 2, step: int = 40) -> dict:
    return {"time": 10.0, "event": "failure", "kind": kind, "rank": rank, "node": node, "step": step}


def test_the_failing_node_is_evicted_after_exclude_after_failures() -> None:
    policy = EvictionPolicy(exclude_after_failures=1, fewest_nodes=2)
    first = failure("n3")
    (eviction,) = nodes_to_evict([first], first, [], policy, since=0)
    assert (eviction.node, eviction.reason) == ("n3", "crash of rank 2 at step 40")
    assert nodes_to_evict([first], first, ["n3"], policy, since=0) == []  # excluded already
    # Two failures needed: the first on n3 evicts nothing, the second does, and says so.
    twice = EvictionPolicy(exclude_after_failures=2, fewest_nodes=2)
    assert nodes_to_evict([first], first, [], twice, since=0) == []
    second = failure("n3", kind="hang", rank=1, step=60)
    (eviction,) = nodes_to_evict([first, second], second, [], twice, since=0)
    assert eviction.reason == "hang of rank 1 at step 60, failure 2 on it"


def test_no_eviction_when_off_for_a_save_or_without_a_node() -> None:
    off = EvictionPolicy(exclude_after_failures=0, fewest_nodes=1)
    assert nodes_to_evict([failure("n3")], failure("n3"), [], off, since=0) == []
    on = EvictionPolicy(exclude_after_failures=1, fewest_nodes=1)
    save = failure("n3", kind="save")  # a refused save is the file system's, not the node's
    assert nodes_to_evict([save], save, [], on, since=0) == []
    unknown = {**failure("n3"), "node": None}
    assert nodes_to_evict([unknown], unknown, [], on, since=0) == []
    # Earlier failures on another node do not evict it at this failure.
    assert [e.node for e in nodes_to_evict([failure("n1"), failure("n3")], failure("n3"), [], on, 0)] == ["n3"]


def test_stragglers_of_this_run_of_the_job_are_evicted_only_when_asked() -> None:
    straggler = {"time": 50.0, "event": "straggler", "rank": 5, "node": "n2", "score": 0.41, "windows": 3}
    earlier = {**straggler, "time": 5.0, "node": "n4"}  # an earlier run of the job: already dealt with
    asked = EvictionPolicy(exclude_after_failures=1, fewest_nodes=1, exclude_stragglers=True)
    (eviction,) = nodes_to_evict([earlier, straggler], None, [], asked, since=20.0)
    assert eviction.node == "n2" and "straggler: rank 5" in eviction.reason
    assert nodes_to_evict([straggler], None, [], EvictionPolicy(1, 1, False), since=20.0) == []


def test_never_exclude_below_min_nodes() -> None:
    partition = ["n1", "n2", "n3"]
    assert room_to_evict(partition, ["n3"], fewest_nodes=2) is None
    why = room_to_evict(partition, ["n2", "n3"], fewest_nodes=2)
    assert why == "that would leave 1 of the partition's 3 nodes, fewer than slurm.min_nodes=2"
    assert "did not say" in room_to_evict(None, ["n3"], fewest_nodes=1)


def test_a_resubmission_excludes_what_the_run_excluded(tmp_path) -> None:
    events = [{"event": "evict", "node": "n3", "excluded": "n3"},
              {"event": "evict", "node": "n2", "skipped": "that would leave 1 ..."}, failure("n1")]
    assert excluded_by_run(events) == ["n3"]


def test_the_policy_travels_to_after_srun_as_flags() -> None:
    assert EvictionPolicy(2, 3, True).flags() == ["--exclude-after-failures", "2", "--min-nodes", "3",
                                                  "--exclude-stragglers"]




def test_min_nodes_submits_a_node_range(tmp_path) -> None:
    config = load_config(DEMO, [f"train.run_dir={tmp_path}", "slurm.nodes=3", "slurm.min_nodes=2",
                                "slurm.gpus_per_node=0", "data.batch_size=16"])
    parameters = submit.sbatch_parameters(config.slurm, "job", [tmp_path])
    assert parameters["additional_parameters"]["nodes"] == "2-3" and parameters["nodes"] == 3
    # Slurm would count the tasks from the fewest nodes and allocate no more: one task per node
    # holding every task's CPUs, and srun starts the node's tasks.
    assert "ntasks_per_node" not in parameters and parameters["cpus_per_task"] == 1
    assert parameters["srun_args"][-2:] == ["--ntasks-per-node=1", "--cpus-per-task=1"]
    four = load_config(DEMO, [f"train.run_dir={tmp_path}", "slurm.nodes=3", "slurm.min_nodes=2",
                              "slurm.gpus_per_node=4", "slurm.cpus_per_task=8"])
    parameters = submit.sbatch_parameters(four.slurm, "job", [tmp_path])
    assert parameters["cpus_per_task"] == 32 and "--ntasks-per-node=4" in parameters["srun_args"]
    plain = load_config(DEMO, [f"train.run_dir={tmp_path}", "slurm.nodes=3", "slurm.gpus_per_node=0"])
    assert "nodes" not in submit.sbatch_parameters(plain.slurm, "job", [tmp_path])["additional_parameters"]


def test_min_nodes_must_keep_the_global_batch_and_cannot_resize_zero(tmp_path) -> None:
    base = [f"train.run_dir={tmp_path}", "slurm.nodes=3", "slurm.min_nodes=2", "slurm.gpus_per_node=0"]
    submit.check_shrink(load_config(DEMO, [*base, "data.batch_size=16"]))  # 48 splits over 2 and 3
    with pytest.raises(SubmitError, match=r"global batch of 45 .* cannot be split evenly on 2 node"):
        submit.check_shrink(load_config(DEMO, [*base, "data.batch_size=15"]))
    with pytest.raises(SubmitError, match="ZeRO-1 partitions the optimizer state per process"):
        submit.check_shrink(load_config(DEMO, [*base, "data.batch_size=16", "parallel.backend=deepspeed",
                                               "parallel.zero_stage=1"]))
    with pytest.raises(ConfigError, match="slurm.min_nodes must be between 0"):
        load_config(DEMO, [*base, "slurm.min_nodes=4"])


def test_a_dry_run_resubmission_excludes_evicted_nodes_unless_told_not_to(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    EventLedger(run_dir).append({"event": "evict", "node": "n3", "reason": "crash", "excluded": "n3"})
    args = [f"--config={DEMO}", "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1", "--exclude", "n7",
            "--dry-run", f"train.run_dir={run_dir}"]
    assert submit.main(args) == 0
    out = capsys.readouterr().out
    assert "excluding n3: earlier jobs of this run excluded them" in out
    assert "#SBATCH --exclude=n3,n7" in out
    assert submit.main([*args, "--no-exclude-evicted"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --exclude=n7" in out and "excluding n3" not in out


NODES = ["n1", "n2", "n3"]


@pytest.mark.parametrize(("messages", "expected"), [
    # A rank killed on n2; its peers' echoes (EXIT_LOST_PEER) came first and are passed over.
    ("srun: error: n1: task 0: Exited with exit code 3\nsrun: error: n2: task 1: Killed\n", (1, "n2", "Killed")),
    # n3 died with its tasks: only the echoes of the others are reported.
    ("srun: error: n1: task 0: Exited with exit code 3\nsrun: error: n2: task 1: Exited with exit code 3\n",
     (None, "n3", "no report from the node (its tasks ended without one)")),
    ("srun: error: Node failure on n3\nsrun: error: n1: task 0: Exited with exit code 3\n",
     (None, "n3", "node failure")),
    # Echoes only, and two silent nodes: no guess beyond srun's first report.
    ("srun: error: n1: task 0: Exited with exit code 3\n", (0, "n1", "Exited with exit code 3")),
])
def test_the_culprit_is_not_an_echo_of_its_death(messages, expected) -> None:
    assert after_srun.first_failed_task(messages, NODES) == expected


def test_a_failure_of_a_dead_node_names_the_node() -> None:
    from rkan_dist.faults import describe_failure

    assert describe_failure({"kind": "crash", "rank": None, "node": "n3", "step": 8}) == "crash of a rank on n3 at step 8"


def test_a_run_that_ended_unrecorded_was_requeued_by_slurm() -> None:
    start = {"time": 1.0, "event": "start", "job_id": "7", "restart_count": 0, "nodes": "n[1-3]", "step": 0}
    assert unrecorded_end([start], "7", 1) == start  # nothing after it: Slurm requeued the job
    assert unrecorded_end([start], "7", 0) is None  # the first run has no previous one
    assert unrecorded_end([start], "7", 2) is None  # run 1 never started training: nothing to blame
    assert unrecorded_end([start], "8", 1) is None  # another job
    for ending in ("stop", "failure", "error", "gave_up"):
        assert unrecorded_end([start, {"time": 2.0, "event": ending}], "7", 1) is None
    assert unrecorded_end([start, {"time": 2.0, "event": "restart"}], "7", 1) == start
