"""torchrun's agent as `rkan-dist train --nproc N` runs it: `python -m rkan_dist.agent REPORT torchrun-args...`.

The same agent as `python -m torch.distributed.run`, with one difference: when a worker fails,
the agent's ChildFailedError (which torchrun's own `main` prints as a traceback and a report box)
is written as JSON to REPORT instead - {global rank: {"exitcode", "local_rank", "pid"}} of the
workers that failed first - and the agent exits 1 without a word. The `rkan-dist` parent
(rkan_dist.supervisor) reads it to tell a configuration error (exit 2) from a crash, records
the crash in the ledger and decides whether to restart; it prints the one line a person reads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def failure_report(failures: dict) -> dict[str, dict]:
    """ChildFailedError.failures (global rank -> ProcessFailure) as plain JSON."""
    return {str(rank): {"exitcode": failure.exitcode, "local_rank": failure.local_rank, "pid": failure.pid}
            for rank, failure in failures.items()}


def main(argv: list[str]) -> int:
    report, torchrun_args = Path(argv[0]), argv[1:]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as err:
        tmp = report.with_name(report.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(failure_report(err.failures)))
        os.replace(tmp, report)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
