"""The local Slurm cluster (slurm/dev-cluster/) for the tests under tests/slurm.

`slurm_cluster` (session) starts the cluster once, points SLURM_CONF at it and stops it when the
session ends, also after failures. `slurm` (per test) is the same cluster, left with no jobs and
every node idle after each test so one test's leftovers never hold the nodes for the next.

A test gets DEFAULT_NODES (2) logical nodes, or exactly N with `@pytest.mark.slurm_nodes(N)`
(1..4): the cluster is restarted with N nodes before it when needed (about 2 s, and it ends every
job). Collection runs the tests of one node count together, so a session restarts at most once
per count; a module-scoped fixture that keeps a job running across tests therefore belongs in a
module whose tests all want one count. After every test that used the cluster, nodes it killed,
downed or drained are revived (SlurmCluster.revive_lost_nodes), so a lost node never poisons the
next test. Tests take nodes away with SlurmCluster.kill_node/down_node/drain_node and give them
back with revive_node (slurm/dev-cluster/node.sh).

There is no accounting daemon, hence no sacct: job state comes from `scontrol show job`, which
keeps finished jobs for MinJobAge (300 s), and every wait has its own timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_CLUSTER = REPO_ROOT / "slurm" / "dev-cluster"
SLURM_TESTS_DIR = Path(__file__).resolve().parent
DEFAULT_NODES = 2
MAX_NODES = 4  # slurm/dev-cluster/common.sh's MAX_NODES
# States after which a job never runs again (a requeued job passes through REQUEUED/PENDING).
FINISHED_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    }
)
# `scontrol show job -o` prints "Key=value Key=value ..."; keys look like JobState,
# AllocNode:Sid, CPUs/Task or ReqB:S:C:T, and values may be empty.
_FIELD_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"slurm_nodes(n): the test needs exactly n logical nodes (1..{MAX_NODES}) on the dev cluster"
    )


def wanted_nodes(item: pytest.Item) -> int:
    """How many logical nodes a test asks for (slurm_nodes mark), DEFAULT_NODES without one."""
    mark = item.get_closest_marker("slurm_nodes")
    if mark is None:
        return DEFAULT_NODES
    nodes = mark.args[0] if mark.args else None
    if not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        raise pytest.UsageError(f"{item.nodeid}: slurm_nodes needs a node count 1..{MAX_NODES}, got {mark.args}")
    return nodes


def uses_cluster(item: pytest.Item) -> bool:
    return "slurm_cluster" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: the mark must be on the items before `-m` selection looks at them.
    for item in items:
        if SLURM_TESTS_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.slurm)
    # Tests of one node count run together (a stable sort keeps each count's order): every change
    # of count restarts the cluster and ends whatever job runs.
    items.sort(key=lambda item: wanted_nodes(item) if uses_cluster(item) else DEFAULT_NODES)


def parse_scontrol_record(line: str) -> dict[str, str]:
    """One `scontrol show ... -o` line -> {key: value}, values kept as strings."""
    matches = list(_FIELD_KEY.finditer(line))
    record = {}
    for match, following in zip(matches, matches[1:] + [None]):
        end = following.start() if following else len(line)
        record[match.group(1)] = line[match.end() : end].strip()
    return record


def find_daemon(name: str) -> str | None:
    """Path of a Slurm/munge daemon; sbin is often missing from PATH outside login shells."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@dataclass
class SlurmCluster:
    """Client-side helpers for the running dev cluster (SLURM_CONF is set for this process)."""

    state_dir: Path
    conf: Path
    nodes: int
    script_env: dict[str, str] = field(default_factory=dict)  # RKAN_SLURM_DIR/PORT for the scripts
    submitted: list[int] = field(default_factory=list)

    def run(self, *args: str, timeout: float = 30, check: bool = True) -> str:
        """Run a Slurm client command and return its stdout; failures show its stderr."""
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def sbatch(self, script_text: str, *args: str, cwd: Path | str | None = None) -> int:
        """Submit a batch script given as text; returns the job id.

        The script's working directory (and so relative output paths) is `cwd` if given.
        """
        if not script_text.startswith("#!"):
            script_text = "#!/bin/bash\n" + script_text
        extra = [f"--chdir={cwd}"] if cwd is not None else []
        result = subprocess.run(
            ["sbatch", "--parsable", *extra, *args],
            input=script_text,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr.strip()}")
        job_id = int(result.stdout.strip().split(";")[0])
        self.submitted.append(job_id)
        return job_id

    def job_state(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o` of one job as a dict (JobState, Restarts, NodeList, ...)."""
        output = self.run("scontrol", "show", "job", "-o", str(job_id), timeout=15)
        lines = [line for line in output.splitlines() if line.strip()]
        if not lines:
            raise LookupError(f"scontrol knows no job {job_id}")
        return parse_scontrol_record(lines[0])

    def wait_for(
        self,
        job_id: int,
        states: str | Iterable[str],
        timeout: float = 60,
        poll_s: float = 0.25,
        min_restarts: int = 0,
    ) -> dict[str, str]:
        """Poll until the job is in one of `states` (and restarted at least `min_restarts`
        times); returns its record. A job that finishes in another state, or the timeout,
        raises with the last record and the job's output, which is what one needs to debug."""
        wanted = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        record: dict[str, str] = {}
        while True:
            record = self.job_state(job_id)
            state = record.get("JobState", "")
            if state in wanted and int(record.get("Restarts", "0")) >= min_restarts:
                return record
            # Finished in another state, or without the restarts asked for: waiting is futile.
            if state in FINISHED_STATES or time.monotonic() >= deadline:
                break
            time.sleep(poll_s)
        raise AssertionError(
            f"job {job_id} not in {sorted(wanted)} (restarts >= {min_restarts}) within "
            f"{timeout:.0f} s; last state {record.get('JobState')} "
            f"reason {record.get('Reason')} restarts {record.get('Restarts')}\n"
            f"{self.job_output(record)}"
        )

    def job_output(self, record: dict[str, str], max_chars: int = 3000) -> str:
        """The tails of every task's stdout and stderr (submitit writes <id>_<task>_log.out/.err
        beside StdOut), for error messages: a failing task is often not task 0."""
        path = Path(record.get("StdOut", ""))
        if not path.is_file():
            return f"(no output file {path})"
        job_id = record.get("JobId", "")
        logs = sorted(path.parent.glob(f"{job_id}_*_log.*")) if job_id else []
        return "\n".join(f"--- {log} ---\n{log.read_text(errors='replace')[-max_chars:]}"
                         for log in (logs or [path]))

    def active_jobs(self) -> list[int]:
        """Ids of jobs that are pending, running or being requeued/completing."""
        output = self.run("squeue", "-h", "-o", "%i", timeout=15)
        return [int(line.split("_")[0]) for line in output.split() if line.strip()]

    def cancel_all(self, timeout: float = 20) -> None:
        """Cancel every job and wait until the nodes are free again."""
        jobs = self.active_jobs()
        if not jobs:
            return
        self.run("scancel", *map(str, jobs), check=False)
        deadline = time.monotonic() + timeout
        while self.active_jobs():
            if time.monotonic() >= deadline:
                raise AssertionError(f"jobs {self.active_jobs()} still active {timeout} s after scancel")
            time.sleep(0.3)

    def start(self, nodes: int) -> str:
        """Run start.sh (a no-op if already up with `nodes`); returns its export line."""
        result = self.script("start.sh", "--nodes", str(nodes), timeout=180)
        self.nodes = nodes
        return result.stdout.strip().splitlines()[-1]

    def script(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a slurm/dev-cluster script on this cluster (the session's state folder and ports,
        even while a test points RKAN_SLURM_DIR elsewhere); a failure raises with its error line."""
        result = _dev_cluster_script(name, *args, timeout=timeout, env=self.script_env)
        if result.returncode != 0:
            raise RuntimeError(f"slurm/dev-cluster/{name} {' '.join(args)} failed:\n{result.stderr.strip()}")
        return result

    def kill_node(self, node: str) -> None:
        """Node `node` dies: SIGKILL to its slurmd and to every process of its job steps. The
        controller notices only when pings fail (about 80 s, SlurmdTimeout); srun then prints
        `srun: error: Node failure on <node>`."""
        self.script("node.sh", "kill", node)

    def down_node(self, node: str, reason: str = "test: node down") -> None:
        """`scontrol update State=DOWN`: Slurm kills (or requeues) the jobs on it at once."""
        self.script("node.sh", "down", node, reason)

    def drain_node(self, node: str, reason: str = "test: node drained") -> None:
        """`scontrol update State=DRAIN`: running jobs go on, no new job starts there."""
        self.script("node.sh", "drain", node, reason)

    def revive_node(self, node: str) -> None:
        """Start the node's slurmd again if it is dead, RESUME it if down or drained, and wait
        until it is up (idle, or allocated to a job waiting for it)."""
        self.script("node.sh", "revive", node, timeout=120)

    def node_states(self) -> dict[str, str]:
        """{"n1": "idle", "n3": "down*", ...} as sinfo's %T prints them ("*": not answering)."""
        output = self.run("sinfo", "-h", "-N", "-o", "%N %T", timeout=15)
        return dict(line.split() for line in output.splitlines() if line.strip())

    def lost_nodes(self) -> list[str]:
        """Nodes whose slurmd is dead, or that are down, drained, failing or not answering."""
        pids = self.daemon_pids()
        states = self.node_states()
        lost = []
        for number in range(1, self.nodes + 1):
            node = f"n{number}"
            state = states.get(node, "")
            dead = not _alive(pids.get(f"slurmd-{node}"))
            if dead or state.endswith("*") or state.startswith(("down", "drain", "fail", "inval")):
                lost.append(node)
        return lost

    def revive_lost_nodes(self) -> list[str]:
        """Revive every lost node (see lost_nodes); returns their names."""
        lost = self.lost_nodes()
        for node in lost:
            self.revive_node(node)
        return lost

    def wait_idle(self, timeout: float = 30) -> None:
        """Wait until every node is idle (a cancelled job's nodes pass through completing)."""
        deadline = time.monotonic() + timeout
        while (states := self.node_states()) and any(state != "idle" for state in states.values()):
            if time.monotonic() >= deadline:
                raise AssertionError(f"nodes not idle {timeout} s after the test: {states}")
            time.sleep(0.3)

    def daemon_pids(self) -> dict[str, int]:
        """{"munged" | "slurmctld" | "slurmd-n1" ...: pid} from start.sh's pid file."""
        lines = (self.state_dir / "run" / "pids").read_text().splitlines()
        return {name: int(pid) for name, pid in (line.split() for line in lines if line.strip())}

    def idle_nodes(self) -> list[str]:
        output = self.run("sinfo", "-h", "-N", "-o", "%N %T", timeout=15)
        return sorted(line.split()[0] for line in output.splitlines() if line.endswith(" idle"))

    def node_addr(self, node_name: str) -> str:
        """NodeAddr of a (logical) node, for code that cannot resolve n1/n2 as host names."""
        output = self.run("scontrol", "show", "node", "-o", node_name, timeout=15)
        return parse_scontrol_record(output.strip())["NodeAddr"]


def _alive(pid: int | None) -> bool:
    """The process lives and is no zombie (this machine's init does not reap orphans at once)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _dev_cluster_script(name: str, *args: str, timeout: float,
                        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(DEV_CLUSTER / name), *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def _first_node_count(session: pytest.Session) -> int:
    """The node count of the first test that uses the cluster: the session starts with it."""
    return next((wanted_nodes(item) for item in session.items if uses_cluster(item)), DEFAULT_NODES)


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest) -> Iterator[SlurmCluster]:
    if find_daemon("slurmctld") is None or find_daemon("munged") is None:
        reason = (
            "Slurm is not installed (slurmctld/munged not found); `make test` installs "
            "slurm-wlm, slurm-client and munge"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; under CI=true the Slurm tests must run")
        pytest.skip(reason)

    state_dir = Path(os.environ.get("RKAN_SLURM_DIR", "/tmp/rkan-dist-slurm"))
    # Tests may point RKAN_SLURM_DIR/PORT at a cluster of their own (monkeypatch); the scripts
    # this session runs on its cluster always get the session's.
    script_env = {"RKAN_SLURM_DIR": str(state_dir)}
    if "RKAN_SLURM_PORT" in os.environ:
        script_env["RKAN_SLURM_PORT"] = os.environ["RKAN_SLURM_PORT"]
    nodes = _first_node_count(request.session)
    # A cluster someone started before the tests (a developer's, `make bench`'s) is theirs to stop.
    found_running = _dev_cluster_script("status.sh", timeout=60, env=script_env).returncode == 0
    started = _dev_cluster_script("start.sh", "--nodes", str(nodes), timeout=180, env=script_env)
    if started.returncode != 0:
        if not found_running:
            _dev_cluster_script("stop.sh", timeout=120, env=script_env)
        pytest.fail(f"slurm/dev-cluster/start.sh failed:\n{started.stderr}", pytrace=False)
    export_line = started.stdout.strip().splitlines()[-1]
    conf = Path(export_line.removeprefix("export SLURM_CONF="))
    previous_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield SlurmCluster(state_dir=state_dir, conf=conf, nodes=nodes, script_env=script_env)
    finally:
        if previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous_conf
        stopped = None if found_running else _dev_cluster_script("stop.sh", timeout=120, env=script_env)
        if stopped is not None and stopped.returncode != 0:
            raise RuntimeError(f"slurm/dev-cluster/stop.sh failed:\n{stopped.stderr}")


@pytest.fixture(autouse=True)
def _slurm_nodes_for_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """Before a test that uses the cluster: the node count it asks for. After it: every node it
    lost revived. Autouse, so tests that take `slurm_cluster` itself get both too."""
    if not uses_cluster(request.node):
        yield
        return
    cluster: SlurmCluster = request.getfixturevalue("slurm_cluster")
    if cluster.nodes != wanted_nodes(request.node):
        cluster.start(wanted_nodes(request.node))
    yield
    cluster.revive_lost_nodes()


@pytest.fixture
def slurm(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """The session cluster, emptied of jobs after the test (passed or not), every node idle."""
    yield slurm_cluster
    # A killed node's slurmd must answer again before the jobs it ran can finish completing.
    slurm_cluster.revive_lost_nodes()
    slurm_cluster.cancel_all()
    slurm_cluster.wait_idle()
