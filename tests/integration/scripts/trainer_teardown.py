"""Run under torchrun: train a few steps (stopping mid-epoch), close the Trainer, and record which
threads are left in this process: `<out>/<backend>-rank<r>.json`.

After Trainer.close() no gloo worker or FFCV reader may be left running: one that is still there
when the interpreter finalizes can abort the process after a successful run (std::terminate).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from rkan_dist.config import load_config
from rkan_dist.trainer import Trainer


def native_thread_names() -> list[str]:
    tasks = Path("/proc/self/task")
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir())


def main() -> None:
    out, backend, config_path, *overrides = sys.argv[1:]
    config = load_config(config_path, [f"parallel.backend={backend}", *overrides])
    with Trainer(config) as trainer:
        during = native_thread_names()
        result = trainer.train()
    record = {"status": result.status, "step": result.global_step,
              "gloo_threads_while_training": [name for name in during if "gloo" in name],
              "gloo_threads_after_close": [name for name in native_thread_names() if "gloo" in name],
              "python_threads_after_close": [thread.name for thread in threading.enumerate()
                                             if thread is not threading.main_thread()]}
    if backend == "deepspeed":
        from deepspeed.utils import groups

        record["deepspeed_world_group_released"] = groups._WORLD_GROUP is None
    Path(out, f"{backend}-rank{os.environ['RANK']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
