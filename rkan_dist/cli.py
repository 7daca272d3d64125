"""`rkan-dist` command line: a thin layer that parses arguments and hands over to the library.

    rkan-dist train   --config CONFIG [--nproc N] [section.key=value ...]
    rkan-dist write   --src DIR --out FILE.beton [...]
    rkan-dist eval    CHECKPOINT_OR_EXPORT --config CONFIG [overrides ...]
    rkan-dist export  CHECKPOINT --out model.pt
    rkan-dist submit  --config CONFIG [--nodes N ...] [overrides ...]
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

from rkan_dist.config import ConfigError, field_help, load_config, to_yaml
from rkan_dist.ledger import Fault

EXIT_USAGE = 2
# A fault (a save the disk refused, ...) ends the run with 1: the crash path may restart it; 2 never is.
EXIT_FAULT = 1
log = logging.getLogger("rkan_dist.cli")


class UserError(Exception):
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
    valid checkpoint, at most `max_restarts` times (see rkan_dist.stops.supervise)."""
    from rkan_dist.stops import supervise

    torchrun_args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "rkan_dist.cli", *argv]
    log.info("launching %d processes: torchrun %s", nproc, " ".join(torchrun_args))
    return supervise(torchrun_args, run_dir, max_restarts)


def cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    config = load_config(args.config, args.overrides, check_paths=True)
    if args.nproc > 1 and not _under_launcher():
        from rkan_dist.resume import check_resume

        check_resume(config.train.run_dir, config.train.resume, args.nproc, config.data.batch_size,
                     config.train.grad_accum)  # a world size that cannot resume: one line before any launch
        return _relaunch_with_torchrun(args.nproc, ["train", "--config", args.config, *args.overrides],
                                       config.train.run_dir, config.train.max_restarts)
    if "SLURM_STEP_ID" in os.environ and "SLURM_JOB_ID" in os.environ:
        # A task of an srun step: Slurm's USR2 means checkpoint, requeue once and exit, on every rank.
        from rkan_dist.submit import run_training_task

        outcome = run_training_task(config)
        if outcome.get("final_eval") is not None and int(os.environ.get("SLURM_PROCID", "0")) == 0:
            print(f"final val top-1: {outcome['final_eval']['eval/top1'] * 100:.2f}%\nrun folder: {outcome['run_dir']}")
        return 0
    from rkan_dist.stops import EXIT_INTERRUPTED, Interrupted, StopSignals, lost_peer, lost_peer_line

    # Before the heavy imports: from here on Ctrl-C / SIGTERM stop at a step boundary with a checkpoint.
    signals = StopSignals("local").install()
    from rkan_dist.trainer import NonFiniteLossError, Trainer

    code = 0
    try:
        with Trainer(config) as trainer:
            signals.attach(trainer)
            result = trainer.train()
            if trainer.dist.is_main:
                print(result.summary, flush=True)
    except Interrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(stop, flush=True)
        # Under torchrun every rank exits 0, or the agent would report a failure (with a traceback);
        # the parent that launched it reads the stop in the ledger and exits 130.
        code = 0 if _under_launcher() else EXIT_INTERRUPTED
    except NonFiniteLossError as err:
        # Every rank stops at the same micro-batch; a restart would meet the same loss at the same
        # step, so this is an error (exit 2, which `--nproc` does not restart), not a failure.
        if int(os.environ.get("RANK", "0")) == 0:
            from rkan_dist.ledger import RequeueLedger

            RequeueLedger(config.train.run_dir).record_error("nonfinite", 0, str(err))
            print(f"rkan-dist: error: {err}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except RuntimeError as err:
        if not (_under_launcher() and lost_peer(err)):
            raise
        # Another rank died: its death is the fault (the launcher records it and may restart the
        # run); this rank's failed collective is only its echo, worth one line, not a traceback.
        print(lost_peer_line(os.environ.get("RANK", "?"), err), file=sys.stderr, flush=True)
        code = EXIT_FAULT
    if config.parallel.backend == "deepspeed" and not _is_cuda_run():
        # DeepSpeed on CPU sometimes aborts in its own atexit/thread teardown ("terminate called
        # without an active exception", exit 134) after all work is done and the process group is
        # closed. Everything is written and flushed by now, so leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


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
    _add_config_args(train)
    train.add_argument("--nproc", type=int, default=1, help="local processes; >1 re-launches under torchrun")
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
    "export": ("rkan_dist.checkpoint", "export_main", "export a checkpoint: its weights plus the model options load_model rebuilds it from"),
    "submit": ("rkan_dist.submit", "main", "submit a (multi-node) training job to Slurm through submitit"),
    "status": ("rkan_dist.status", "main", "a run's job state, step, latest valid checkpoint, restarts and time lost to faults"),
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
    except (ConfigError, UserError) as err:
        print(f"rkan-dist: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except Fault as err:  # every rank raises it; one prints it
        if err.report:
            print(f"rkan-dist: {err}", file=sys.stderr)
        return EXIT_FAULT
    except KeyboardInterrupt as err:  # Aborted (a second Ctrl-C), or one before any handler was installed
        print(f"rkan-dist: {err or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
