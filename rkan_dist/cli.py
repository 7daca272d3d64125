"""`rkan-dist` command line: a thin layer that parses arguments and hands over to the library.

    rkan-dist train   --config CONFIG [--nproc N] [section.key=value ...]
    rkan-dist train   --grid KEY=V1,V2 [--grid ...] | --grid GRID.yaml [--dry-run] ...   (a grid, run by run)
    rkan-dist write   --src DIR --out FILE.beton [...]
    rkan-dist eval    CHECKPOINT_OR_EXPORT --config CONFIG [overrides ...]
    rkan-dist export  CHECKPOINT --out model.pt
    rkan-dist submit  --config CONFIG [--nodes N ...] [--grid ...] [overrides ...]
    rkan-dist compare DIR ... [--baseline KEY=VALUE] [--format md|csv|json] [--plot FILE.png]
    rkan-dist status  RUN_DIR
    rkan-dist bench   NAME [--quick] [--json FILE]
    rkan-dist config  show CONFIG [overrides ...] | keys

User mistakes (bad config keys, values, paths) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rkan_dist.config import field_help, load_config, to_yaml
from rkan_dist.faults import ConfigError, outcome_of

log = logging.getLogger("rkan_dist.cli")


class UserError(ConfigError):
    """A problem the user can fix from the command line; printed without a traceback."""


def _add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--config", required=required, help="YAML recipe, e.g. configs/demo.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="dotted overrides applied after the file, e.g. optim.lr=0.2 train.max_steps=100")


def _under_launcher() -> bool:
    """True inside torchrun, or inside an srun/submitit step with several tasks."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        return True
    return int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ


def _relaunch_with_torchrun(nproc: int, argv: list[str], run_dir: str, max_restarts: int) -> int:
    """Run this same command again under torchrun's agent with `nproc` local processes; Ctrl-C and
    SIGTERM reach the workers through this process, and a crash restarts them all from the latest
    valid checkpoint, at most `max_restarts` times (see rkan_dist.supervisor)."""
    from rkan_dist.supervisor import supervise

    torchrun_args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "rkan_dist.cli", *argv]
    log.info("launching %d processes: torchrun %s", nproc, " ".join(torchrun_args))
    return supervise(torchrun_args, run_dir, max_restarts)


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    if args.grid:
        from rkan_dist.grid import train_grid

        return train_grid(args.config, args.grid, args.overrides, nproc=args.nproc, dry_run=args.dry_run)
    if args.config is None or args.dry_run:
        raise UserError("rkan-dist train needs --config CONFIG (--dry-run goes with --grid)")
    config = load_config(args.config, args.overrides, check_paths=True)
    if args.nproc > 1 and not _under_launcher():
        from rkan_dist.resume import check_resume

        check_resume(config.train.run_dir, config.train.resume, args.nproc, config.data.batch_size,
                     config.train.grad_accum)  # a world size that cannot resume: one line before any launch
        return _relaunch_with_torchrun(args.nproc, ["train", "--config", args.config, *args.overrides],
                                       config.train.run_dir, config.train.max_restarts)
    if "SLURM_STEP_ID" in os.environ and "SLURM_JOB_ID" in os.environ:
        # A task of an srun step: Slurm's USR2 means checkpoint, requeue once and exit, on every rank.
        from rkan_dist.slurm_task import run_training_task

        outcome = run_training_task(config)
        if outcome.get("final_eval") is not None and int(os.environ.get("SLURM_PROCID", "0")) == 0:
            print(f"final val top-1: {outcome['final_eval']['eval/top1'] * 100:.2f}%\nrun folder: {outcome['run_dir']}")
        return 0
    from rkan_dist.stops import StopSignals

    # Before the heavy imports: from here on Ctrl-C / SIGTERM stop at a step boundary with a checkpoint.
    signals = StopSignals("local").install()
    from rkan_dist.trainer import Trainer

    code = 0
    try:
        with Trainer(config) as trainer:
            signals.attach(trainer)
            result = trainer.train()
            if trainer.dist.is_main:
                print(result.summary, flush=True)
    except (Exception, KeyboardInterrupt) as err:  # an interrupt too: every rank stopped at a step boundary and saved
        code = _end_run(err, config)
    if config.parallel.backend == "deepspeed" and not _is_cuda_run():
        # DeepSpeed on CPU sometimes aborts in its own atexit/thread teardown ("terminate called
        # without an active exception", exit 134) after all work is done and the process group is
        # closed. Everything is written and flushed by now, so leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _end_run(error: BaseException, config) -> int:
    """The exit code of a training process that `error` ended (rkan_dist.faults.outcome_of): its one
    line printed, and its ledger "error" written where no restart can fix it and the Trainer made
    the run folder; an error no launcher knows raises."""
    rank = int(os.environ.get("RANK", "0"))
    outcome = outcome_of(error, rank, under_launcher=_under_launcher())
    if outcome is None:
        raise error
    if outcome.error_kind is not None and Path(config.train.run_dir).is_dir():
        from rkan_dist.ledger import EventLedger, attempt_started, record_or_warn

        ledger = EventLedger(config.train.run_dir)
        record_or_warn(ledger, ledger.record_error, outcome.error_kind, rank, str(error), since=attempt_started())
    if outcome.line:
        print(outcome.line, file=sys.stdout if outcome.to_stdout else sys.stderr, flush=True)
    return outcome.code


def _is_cuda_run() -> bool:
    import torch

    return torch.cuda.is_available()


def cmd_config(args: argparse.Namespace, argv: list[str]) -> int:
    if args.action == "keys":
        for key, text in field_help().items():
            print(f"{key:34s} {text}")
        return 0
    if not args.path:
        raise UserError("usage: rkan-dist config show CONFIG [section.key=value ...]")
    print(to_yaml(load_config(args.path, args.overrides)), end="")
    return 0


def _run_delegated(argv: list[str]) -> int:
    import importlib

    module, function, _ = DELEGATED[argv[0]]
    try:
        target: Callable[[list[str]], int] = getattr(importlib.import_module(module), function)
    except (ModuleNotFoundError, AttributeError) as err:
        if isinstance(err, ModuleNotFoundError) and err.name != module:
            raise
        raise UserError(f"'rkan-dist {argv[0]}' is not implemented yet") from None
    return int(target(argv[1:]) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rkan-dist", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model (one process, or N local processes with --nproc)",
                           description="Train from a YAML recipe plus overrides. Under torchrun or srun the "
                                       "process joins the existing process group.")
    _add_config_args(train, required=False)
    train.add_argument("--nproc", type=int, default=1, help="local processes; >1 re-launches under torchrun")
    train.add_argument("--grid", action="append", metavar="KEY=V1,V2,... | GRID.yaml",
                       help="train a grid's runs here, one after another (repeat for the cartesian product)")
    train.add_argument("--dry-run", action="store_true", help="with --grid: print the runs and their state")
    train.set_defaults(run=cmd_train)

    config = sub.add_parser("config", help="show a resolved config, or list every key with its meaning")
    config.add_argument("action", choices=("show", "keys"))
    config.add_argument("path", nargs="?", help="YAML recipe (for show)")
    config.add_argument("overrides", nargs="*", metavar="section.key=value")
    config.set_defaults(run=cmd_config)

    for name, (_, _, text) in DELEGATED.items():  # listed for --help; main() dispatches them
        sub.add_parser(name, help=text, add_help=False)
    return parser


# Subcommands with their own argument parsers, next to the code they drive (so that
# `rkan-dist write --help` shows the writer's options): name -> (module, function, help).
DELEGATED = {
    "write": ("rkan_dist.data.write", "main", "turn an ImageFolder tree into an FFCV .beton file"),
    "eval": ("rkan_dist.evaluate", "main", "evaluate a checkpoint or an exported state_dict"),
    "export": ("rkan_dist.export", "export_main", "export a checkpoint: its weights plus the model options load_model rebuilds it from"),
    "submit": ("rkan_dist.submit", "main", "submit a (multi-node) training job to Slurm through submitit"),
    "status": ("rkan_dist.status", "main", "a run's job state, step, latest valid checkpoint, restarts and time lost to faults"),
    "compare": ("rkan_dist.compare", "main", "a grid's (or any runs') results grouped over seeds: mean, std, n, "
                "difference to a baseline with its 95%% interval"),
    "bench": ("rkan_dist.bench", "main", "run benchmarks: kan_conv, model_overhead, loaders, engines, checkpoint, startup, all"),
}


def main(argv: list[str] | None = None) -> int:
    from rkan_dist.log import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        if argv and argv[0] in DELEGATED:
            return _run_delegated(argv)
        args = build_parser().parse_args(argv)
        return args.run(args, argv)
    except BaseException as err:  # a configuration error, a fault, a second Ctrl-C: one line and its exit code
        outcome = outcome_of(err, int(os.environ.get("RANK", "0")), under_launcher=_under_launcher())
        if outcome is None:
            raise
        if outcome.line:
            print(outcome.line, file=sys.stdout if outcome.to_stdout else sys.stderr, flush=True)
        return outcome.code


if __name__ == "__main__":
    sys.exit(main())
