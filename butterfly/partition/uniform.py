"""The uniform strategy: contiguous stages of (nearly) equal layer counts, one per worker."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import PartitionError
from ..protocol import StageSpec

__all__ = ["plan_uniform"]


def plan_uniform(num_layers: int, workers: Sequence[tuple[str, str]]) -> tuple[StageSpec, ...]:
    """Split ``num_layers`` over ``workers`` (``(node_id, address)`` pairs, in order).

    The first ``num_layers % n`` stages get one layer more. With more workers than
    layers, the extra workers are left idle.
    """
    if not workers:
        raise PartitionError("no nodes available: cannot place a model on zero workers")
    if num_layers <= 0:
        raise PartitionError(f"cannot place a model with {num_layers} layers")
    n = min(len(workers), num_layers)
    base, extra = divmod(num_layers, n)
    stages = []
    start = 0
    for i, (node_id, address) in enumerate(workers[:n]):
        stop = start + base + (1 if i < extra else 0)
        stages.append(StageSpec(index=i, start=start, stop=stop, node_id=node_id, address=address))
        start = stop
    return tuple(stages)
