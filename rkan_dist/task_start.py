"""`python -u -m rkan_dist.task_start [-u] -m MODULE ARGS...`: run MODULE as `python -m` would, in a
Slurm task that holds USR2 and SIGTERM from its first import on, for its StopSignals.

`rkan-dist submit` makes this submitit's Python command, so each task runs
`python -u -m rkan_dist.task_start -u -m submitit.core._submit FOLDER`. Without it, a USR2 or
SIGTERM that reaches a task while it still imports submitit and unpickles the job (the first
fraction of a second, measured: enough for a preemption or an early time-limit signal to land in)
kills it with the default action, before any handler exists. Here the only module imported first
is rkan_dist.stops (standard library only), whose import holds USR2 and SIGTERM until the task's
StopSignals takes them (see rkan_dist.stops.hold_slurm_signals).
"""

from __future__ import annotations

import runpy
import sys

import rkan_dist.stops  # noqa: F401 - first: its import holds USR2 and SIGTERM for StopSignals

USAGE = "usage: python -m rkan_dist.task_start [-u] -m MODULE [ARGS...]"


def module_and_argv(argv: list[str]) -> tuple[str, list[str]]:
    """['-u', '-m', 'pkg.mod', 'a'] -> ('pkg.mod', ['pkg.mod', 'a']): `-u` is the interpreter's
    flag, repeated by submitit's command line; the real `-u` is given before `-m rkan_dist.task_start`."""
    args = list(argv)
    while args[:1] == ["-u"]:
        args.pop(0)
    if len(args) < 2 or args[0] != "-m":
        raise SystemExit(USAGE)
    return args[1], [args[1], *args[2:]]


def main(argv: list[str]) -> None:
    module, sys.argv = module_and_argv(argv)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
