"""The Python API under Ctrl-C: Trainer(config).train() until the test sends SIGINT; prints one JSON line.

    api_interrupt.py CONFIG [overrides ...]
"""

from __future__ import annotations

import json
import signal
import sys

from rkan_dist import Interrupted, Trainer, load_config


def main() -> None:
    config = load_config(sys.argv[1], sys.argv[2:])
    # Python's default_int_handler, or SIG_IGN when the test runner was started in the background
    # by a non-interactive shell (its children inherit the ignored SIGINT)
    before = signal.getsignal(signal.SIGINT)
    with Trainer(config) as trainer:
        try:
            trainer.train()
            event = {"event": "finished"}
        except Interrupted as stop:
            event = {"event": "interrupted", "step": stop.step, "checkpoint": str(stop.checkpoint),
                     "message": str(stop), "keyboard_interrupt": isinstance(stop, KeyboardInterrupt),
                     "signal": stop.signal_name,
                     "handler_restored": signal.getsignal(signal.SIGINT) is before}
    print(json.dumps(event), flush=True)


if __name__ == "__main__":
    main()
