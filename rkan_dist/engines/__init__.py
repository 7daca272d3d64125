"""Engine implementations behind `rkan_dist.parallel.wrap` (DDP and DeepSpeed, one interface)."""

from rkan_dist.engines.base import PRECISIONS, Engine, StepResult

__all__ = ["PRECISIONS", "Engine", "StepResult"]
