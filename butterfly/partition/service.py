"""The partition service: turns the live workers into a placement with the configured strategy."""

from __future__ import annotations

import time
from collections.abc import Sequence

from ..config import PartitionConfig
from ..errors import PartitionError
from ..metrics import MetricsSink
from ..protocol import StageSpec
from .uniform import plan_uniform

__all__ = ["STRATEGIES", "PartitionService"]

STRATEGIES = {"uniform": plan_uniform}


class PartitionService:
    """Plans placements. Pure computation today; a cache and measured costs plug in here."""

    def __init__(self, config: PartitionConfig, metrics: MetricsSink) -> None:
        self.config = config
        self.metrics = metrics
        self.last_planning_s = 0.0

    def plan(self, num_layers: int, workers: Sequence[tuple[str, str]]) -> tuple[StageSpec, ...]:
        strategy = STRATEGIES.get(self.config.default_strategy)
        if strategy is None:
            raise PartitionError(
                f"unknown strategy {self.config.default_strategy!r}; known: {', '.join(STRATEGIES)}"
            )
        t0 = time.perf_counter()
        stages = strategy(num_layers, workers)
        self.last_planning_s = time.perf_counter() - t0
        return stages
