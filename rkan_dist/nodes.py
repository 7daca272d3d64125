"""Which node a process, a rank or a failure belongs to, and Slurm's hostlists ('n[1-3,5]').

A node is named as Slurm names it (SLURMD_NODENAME: several logical nodes may share one host, as on
the dev cluster), else by the host name. Ranks are placed on nodes as srun's default block
distribution places them: the first SLURM_TASKS_PER_NODE tasks on the first node of
SLURM_JOB_NODELIST, and so on. Standard library only: the ledger, the watchdog and after-srun use it.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable, Mapping


def this_node(env: Mapping[str, str] = os.environ) -> str:
    """This process's node: Slurm's name for it inside a job, else the host name."""
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def tasks_per_node_counts(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE ('4(x2),3', '2') as one count per node ([4, 4, 3], [2])."""
    counts: list[int] = []
    for item in filter(None, text.strip().split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            raise ValueError(f"bad SLURM_TASKS_PER_NODE entry {item!r} in {text!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def node_of_rank(rank: int | None, env: Mapping[str, str] = os.environ) -> str | None:
    """The node global rank `rank` runs on: in a Slurm job by block distribution over the job's nodes
    (None when the job's variables do not say); outside Slurm every rank is on this host."""
    if rank is None:
        return None
    if "SLURM_JOB_NODELIST" not in env:
        return this_node(env)
    try:
        nodes = parse_nodelist(env["SLURM_JOB_NODELIST"])
        # A step's own placement first: a job that may shrink asks Slurm for one task per node and
        # srun starts several (rkan_dist.submit), so the job's count is not the step's.
        counts = tasks_per_node_counts(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
    except ValueError:
        return None
    first = 0
    for node, count in zip(nodes, counts):
        if first <= rank < first + count:
            return node
        first += count
    return None


def join_nodes(nodes: Iterable[str]) -> str:
    """Node names as one Slurm node list (sorted, without repeats): what --exclude and ExcNodeList take."""
    return ",".join(sorted(set(filter(None, nodes)), key=_natural))


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def parse_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist such as 'n[1-2,5]', 'a1,b2' or 'gpu[01-02]-ib' into host names.

    Used when `scontrol show hostnames` is not available; zero padding ('01') is kept.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty Slurm nodelist")
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts += _expand_one(item)
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside [...]."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm nodelist {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm nodelist {text!r}")
    parts.append(text[start:])
    return [part for part in parts if part]


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    prefix, suffix = item[: match.start()], item[match.end():]
    names = []
    for chunk in match.group(1).split(","):
        if "-" in chunk:
            low, high = chunk.split("-", 1)
            if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
                raise ValueError(f"bad range {chunk!r} in Slurm nodelist {item!r}")
            width = len(low)
            names += [f"{number:0{width}d}" for number in range(int(low), int(high) + 1)]
        elif chunk.isdigit():
            names.append(chunk)
        else:
            raise ValueError(f"bad entry {chunk!r} in Slurm nodelist {item!r}")
    expanded = []
    for name in names:  # a later bracket group (rack[1-2]-n[1-2]) expands recursively
        expanded += _expand_one(prefix + name + suffix)
    return expanded
