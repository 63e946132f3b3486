"""The public planning API: ``plan`` and ``estimate_quality``.

>>> partitions = plan(layers, nodes, "topology_aware", objective="throughput")
>>> estimate_quality(partitions, layers, nodes).estimated_throughput_rps
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Sequence

import numpy as np

from ..errors import PartitionError
from ..types import LayerInfo, ModelPartition, NodeCapability, PartitionQuality, Topology
from .costs import CostModel, Stage, merge_adjacent
from .dp import EXACT_MAX_NODES, exact_plan, search_orders
from .repeats import EXHAUSTIVE_MAX_PLANS, better, exhaustive_plan, memory_tight, wrap_search

__all__ = ["OBJECTIVES", "PartitionStrategy", "estimate_quality", "plan"]

OBJECTIVES = ("throughput", "latency")
#: Time the heuristic may spend improving node orders (and, when memory binds, wrap plans).
HEURISTIC_BUDGET_S = 0.03
#: Share of ``HEURISTIC_BUDGET_S`` left for wrap plans when some node cannot hold the model.
HEURISTIC_WRAP_SHARE = 1 / 3
#: After the exact DP, wrap plans get this share of the DP's time (at least the minimum).
EXACT_WRAP_SHARE = 0.1
EXACT_WRAP_MIN_S = 0.01
#: While no plan fits in memory, wrap plans are searched for up to this long in all.
INFEASIBLE_BUDGET_S = 1.0


class PartitionStrategy(enum.StrEnum):
    UNIFORM = "uniform"  # contiguous, equal layer counts, every node in the given order
    LOAD_BALANCED = "load_balanced"  # contiguous, proportional to node speed, memory-feasible
    TOPOLOGY_AWARE = "topology_aware"  # best for the cost model (dp.py, repeats.py)


def _check(
    layers: Sequence[LayerInfo], nodes: Sequence[NodeCapability], strategy: str, objective: str
) -> None:
    if strategy not in {s.value for s in PartitionStrategy}:
        known = ", ".join(s.value for s in PartitionStrategy)
        raise PartitionError(f"unknown strategy {strategy!r}; known: {known}")
    if objective not in OBJECTIVES:
        raise PartitionError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    if not nodes:
        raise PartitionError("no nodes available: cannot place a model on zero workers")
    if not layers:
        raise PartitionError("the model has no layers to place")
    ids = [n.node_id for n in nodes]
    if len(set(ids)) != len(ids):
        raise PartitionError(f"node ids must be unique, got {ids}")
    for node in nodes:
        if not node.compute_power > 0:
            raise PartitionError(
                f"node {node.node_id!r} has compute_power {node.compute_power}; expected > 0"
            )


def _missing_memory(layers: Sequence[LayerInfo], nodes: Sequence[NodeCapability]) -> str:
    needed = sum(layer.memory_bytes for layer in layers)
    available = sum(node.memory_bytes for node in nodes)
    if needed > available:
        return (
            f"the model needs {needed} bytes of weights and the {len(nodes)} nodes have {available} "
            f"in total: {needed - available} bytes missing"
        )
    largest = max(nodes, key=lambda n: n.memory_bytes)
    biggest = max(layers, key=lambda layer: layer.memory_bytes)
    if biggest.memory_bytes > largest.memory_bytes:
        return (
            f"layer {biggest.id} alone needs {biggest.memory_bytes} bytes and the largest node "
            f"{largest.node_id!r} has {largest.memory_bytes}: {biggest.memory_bytes - largest.memory_bytes} "
            "bytes missing on one node"
        )
    return (
        f"the model needs {needed} of the {available} bytes the nodes have, but the planner "
        "found no split into contiguous stages (a node may hold several) that fits each "
        "node's memory; add memory to the nodes or add a node"
    )


def _uniform(costs: CostModel) -> list[Stage]:
    n, m = costs.num_layers, min(costs.num_nodes, costs.num_layers)
    base, extra = divmod(n, m)
    stages, start = [], 0
    for a in range(m):
        stop = start + base + (1 if a < extra else 0)
        stages.append((a, start, stop))
        start = stop
    return stages


def _load_balanced(costs: CostModel) -> list[Stage]:
    """Walk the layers, giving each node (in order) its speed-proportional share of the work.

    A stage gives back layers until it fits its node's memory; the last node takes the rest.
    """
    power = np.array([node.compute_power for node in costs.nodes])
    share = costs.prefix_cost[-1] * power / power.sum()
    n, stages, start = costs.num_layers, [], 0
    for a in range(costs.num_nodes):
        if start == n:
            break
        if a == costs.num_nodes - 1:
            stop = n
        else:
            target = costs.prefix_cost[start] + share[a]
            stop = int(np.clip(np.searchsorted(costs.prefix_cost, target), start + 1, n))
        while stop > start + 1 and not np.isfinite(costs.compute[a, start, stop]):
            stop -= 1
        stages.append((a, start, stop))
        start = stop
    return stages


def plan(
    layers: Sequence[LayerInfo],
    nodes: Sequence[NodeCapability],
    strategy: str = "topology_aware",
    *,
    topology: Topology | None = None,
    objective: str = "throughput",
) -> list[ModelPartition]:
    """Split ``layers`` into contiguous stages on ``nodes`` with ``strategy``.

    Raises :class:`PartitionError` when there are no nodes, the strategy or objective is
    unknown, or the model does not fit (the message says how many bytes are missing where).
    """
    _check(layers, nodes, strategy, objective)
    costs = CostModel(layers, nodes, topology or Topology())
    if strategy == PartitionStrategy.TOPOLOGY_AWARE:
        value, stages = _topology_aware(costs, objective)
        if not stages or not np.isfinite(value):
            raise PartitionError(f"cannot place the model: {_missing_memory(layers, nodes)}")
    else:
        stages = _uniform(costs) if strategy == PartitionStrategy.UNIFORM else _load_balanced(costs)
        covered = stages[-1][2] if stages else 0
        overfull = [(a, i, j) for a, i, j in stages if not np.isfinite(costs.compute[a, i, j])]
        if covered < costs.num_layers or overfull:
            if overfull:
                a, i, j = overfull[0]
                node = nodes[a]
                need = costs.memory(i, j)
                raise PartitionError(
                    f"cannot place the model with {strategy}: layers {i}..{j - 1} need {need:.0f} bytes "
                    f"on node {node.node_id!r}, which has {node.memory_bytes}: "
                    f"{need - node.memory_bytes:.0f} bytes missing there"
                )
            raise PartitionError(
                f"cannot place the model with {strategy}: {_missing_memory(layers, nodes)}"
            )
    return _partitions(stages, costs)


def _topology_aware(costs: CostModel, objective: str) -> tuple[float, list[Stage]]:
    """The best plan found; a node holds several stages only where that is strictly better.

    With at most ``EXHAUSTIVE_MAX_PLANS`` plans, every plan is tried, with and without
    repeated nodes (:func:`.repeats.exhaustive_plan`): the result is optimal over all plans.
    Otherwise, one stage per node first: the exact DP up to ``EXACT_MAX_NODES`` nodes, the
    order search above. Then wrap plans (:func:`.repeats.wrap_search`): for
    ``EXACT_WRAP_SHARE`` of the exact DP's time (at least ``EXACT_WRAP_MIN_S``); above
    ``EXACT_MAX_NODES``, only where some node cannot hold the whole model, when the order
    search, given ``1 - HEURISTIC_WRAP_SHARE`` of ``HEURISTIC_BUDGET_S``, returns a plan
    shaped by memory (:func:`.repeats.memory_tight`), for the rest of the budget. While no
    plan fits, wrap plans are searched until ``INFEASIBLE_BUDGET_S`` has passed.
    """
    start = time.perf_counter()
    if costs.num_nodes**costs.num_layers <= EXHAUSTIVE_MAX_PLANS:
        incumbent = exhaustive_plan(costs, objective, one_stage_per_node=True)
        everything = exhaustive_plan(costs, objective)
        value, stages = everything if better(everything[0], incumbent[0]) else incumbent
        return value, merge_adjacent(stages)
    wrap_deadline: float | None = None  # None: wrap plans cannot help enough to be searched
    if costs.num_nodes <= EXACT_MAX_NODES:
        incumbent = exact_plan(costs, objective)
        spent = time.perf_counter() - start
        wrap_deadline = time.perf_counter() + max(EXACT_WRAP_MIN_S, EXACT_WRAP_SHARE * spent)
    else:
        # Memory can only shape the plan if some node cannot hold the whole model; wrap plans
        # are searched, in the rest of the budget, only where it does.
        may_bind = bool((costs.capacity < costs.prefix_mem[-1]).any())
        share = HEURISTIC_WRAP_SHARE if may_bind else 0.0
        incumbent = search_orders(costs, objective, HEURISTIC_BUDGET_S * (1 - share))
        if may_bind and memory_tight(costs, incumbent[1]):
            wrap_deadline = start + HEURISTIC_BUDGET_S
    if wrap_deadline is not None:
        found = wrap_search(
            costs,
            objective,
            incumbent,
            wrap_deadline,
            deadline_if_none=start + INFEASIBLE_BUDGET_S,
        )
    else:
        found = incumbent
    value, stages = found
    return value, merge_adjacent(stages)


def _partitions(stages: Sequence[Stage], costs: CostModel) -> list[ModelPartition]:
    return [
        ModelPartition(
            id=s,
            layer_range=range(i, j),
            assigned_node=costs.nodes[a].node_id,
            estimated_time_ms=t,
        )
        for s, ((a, i, j), t) in enumerate(zip(stages, costs.stage_times(stages), strict=True))
    ]


def estimate_quality(
    partitions: Sequence[ModelPartition],
    layers: Sequence[LayerInfo],
    nodes: Sequence[NodeCapability],
    topology: Topology | None = None,
) -> PartitionQuality:
    """Score a plan under the cost model; every figure is computed from the inputs."""
    if not partitions:
        raise PartitionError("an empty plan has no quality")
    costs = CostModel(layers, nodes, topology or Topology())
    index = {node.node_id: a for a, node in enumerate(nodes)}
    try:
        stages = [
            (index[p.assigned_node], p.layer_range.start, p.layer_range.stop) for p in partitions
        ]
    except KeyError as exc:
        raise PartitionError(
            f"plan uses node {exc.args[0]!r}, which is not among the nodes given"
        ) from None
    # A node holding several stages carries all of them: balance and throughput are per node.
    loads = costs.node_loads(stages)
    busiest = max(loads.values())
    boundary_bytes = sum(
        layers[j - 1].output_bytes for (a, _, j), (b, _, _) in itertools.pairwise(stages) if a != b
    )
    return PartitionQuality(
        load_balance=min(loads.values()) / busiest if busiest > 0 else 1.0,
        communication_volume_mb=boundary_bytes / 1e6,
        peak_memory_gb=max(costs.node_memory(stages).values()) / 1e9,
        estimated_latency_ms=sum(costs.stage_times(stages)),
        estimated_throughput_rps=1000.0 / busiest if busiest > 0 else float("inf"),
    )
