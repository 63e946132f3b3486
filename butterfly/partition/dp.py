"""Optimal contiguous placement with one stage per node, by dynamic programming over :mod:`.costs`.

The plans searched here are sequences of stages ``(node, start, stop)`` covering the layers
in order, each on a different node; nodes not in the plan stay idle (using a node can slow
a pipeline down). Both the stage boundaries and the order of the nodes are chosen. Plans in
which a node holds several non-adjacent stages are searched by :mod:`.repeats`, which uses
``ordered_plan`` for the part of such a plan that has one stage per node.

Exact (``exact_plan``): a DP over (set of nodes used, node of the next stage, first layer
of the next stage). Choosing a stage's successor together with the stage is what makes the
outgoing transfer — which depends on both ends of the link — part of the stage's time.
It costs O(2^N · N² · L²) for N nodes and L layers, vectorised with numpy.

Measured on 2 cores: 12 nodes take ≈ 0.9 s for 12 layers and ≈ 3.8 s for 100 layers
(plans are cached, so this is paid once per change of the worker set).

Heuristic (``ordered_plan`` + ``search_orders``), used above ``EXACT_MAX_NODES`` nodes:
the same DP for one fixed node order
(O(N² · L²), exact for that order, idle nodes allowed), improved by hill-climbing over
orders (swapping two nodes) from a few starting orders, within a time budget.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from .costs import CostModel, Stage

__all__ = ["EXACT_MAX_NODES", "Stage", "evaluate", "exact_plan", "ordered_plan", "search_orders"]

#: Node counts up to this use the exact subset DP (when its work fits the budget).
EXACT_MAX_NODES = 12


def _combine(objective: str, acc: np.ndarray, stage: np.ndarray) -> np.ndarray:
    combined: np.ndarray = np.maximum(acc, stage) if objective == "throughput" else acc + stage
    return combined


def evaluate(plan: Sequence[Stage], costs: CostModel, objective: str) -> float:
    """The plan's cost: its busiest node's load (throughput) or the sum of its stages (latency).

    A node holding several stages carries the sum of their times and of their memory (see
    :meth:`.CostModel.plan_ms`); with one stage per node the load is the slowest stage.
    """
    return costs.plan_ms(plan, objective)


def exact_plan(costs: CostModel, objective: str) -> tuple[float, list[Stage]]:
    """The optimal plan over every node subset and order; ``(inf, [])`` if none fits in memory."""
    n, m = costs.num_layers, costs.num_nodes
    full = 1 << m
    best = np.full((full, m, n + 1), np.inf)
    # parent[mask, b, j] = (previous node, previous stage's first layer) of the best path.
    parent_node = np.full((full, m, n + 1), -1, dtype=np.int16)
    parent_start = np.full((full, m, n + 1), -1, dtype=np.int32)
    for b in range(m):
        best[1 << b, b, 0] = 0.0
    final_value, final_state = np.inf, None
    for mask in range(1, full):
        members = [b for b in range(m) if mask >> b & 1]
        others = [c for c in range(m) if not mask >> c & 1]
        for b in members:
            acc = best[mask, b]
            starts = np.flatnonzero(np.isfinite(acc[:n]))
            if not len(starts):
                continue
            compute = costs.compute[b][starts]  # (starts, n + 1)
            # The stage on b ends the model.
            last = _combine(objective, acc[starts], compute[:, n])
            k = int(np.argmin(last))
            if last[k] < final_value:
                final_value, final_state = float(last[k]), (mask, b, int(starts[k]))
            if not others:
                continue
            # The stage on b is followed by one on c: times (c, start, stop).
            stage = compute[None, :, :] + costs.transfer[b, others][:, None, :]
            totals = _combine(objective, acc[starts][None, :, None], stage)
            totals[:, :, n] = np.inf  # a stage followed by another cannot end the model
            choice = np.argmin(totals, axis=1)  # (c, stop)
            values = np.take_along_axis(totals, choice[:, None, :], axis=1)[:, 0, :]
            cs = np.array(others)
            targets = mask | (1 << cs)
            current = best[targets, cs]
            better = values < current
            best[targets, cs] = np.where(better, values, current)
            parent_node[targets, cs] = np.where(better, b, parent_node[targets, cs])
            parent_start[targets, cs] = np.where(better, starts[choice], parent_start[targets, cs])
    if final_state is None:
        return np.inf, []
    mask, b, start = final_state
    plan = [(b, start, n)]
    while start > 0:
        prev, prev_start = int(parent_node[mask, b, start]), int(parent_start[mask, b, start])
        mask &= ~(1 << b)
        plan.append((prev, prev_start, start))
        b, start = prev, prev_start
    plan.reverse()
    return final_value, plan


def ordered_plan(
    costs: CostModel,
    order: Sequence[int],
    objective: str,
    *,
    stop: int | None = None,
    head: np.ndarray | None = None,
    tail: int | None = None,
) -> tuple[float, list[Stage]]:
    """The optimal plan whose stages use nodes in ``order`` (any of them may be skipped).

    By default the plan covers every layer. :mod:`.repeats` uses the keywords to place only
    layers ``[0, stop)``: ``tail`` is the node that receives layer ``stop - 1``'s output
    (that transfer is part of the last stage's time; ``None``: the model ends at ``stop``),
    and ``head[i]``, when given, replaces the time of a first stage ``[0, i)`` on
    ``order[0]``, which must then hold the first stage.
    """
    n, m = costs.num_layers if stop is None else stop, len(order)
    best = np.full((m, n + 1), np.inf)  # best[p, j]: next stage starts at j on order[p]
    parent = np.full((m, n + 1, 2), -1, dtype=np.int32)
    if head is None:
        best[:, 0] = 0.0
    else:
        best[0, 0] = 0.0
    final_value, final_state = np.inf, None
    for p in range(m):
        b = order[p]
        acc = best[p]
        starts = np.flatnonzero(np.isfinite(acc[:n]))
        if not len(starts):
            continue
        compute = (
            head[None, : n + 1]
            if head is not None and p == 0
            else costs.compute[b, starts, : n + 1]
        )
        end = compute[:, n] if tail is None else compute[:, n] + costs.transfer[b, tail, n]
        last = _combine(objective, acc[starts], end)
        k = int(np.argmin(last))
        if last[k] < final_value:
            final_value, final_state = float(last[k]), (p, int(starts[k]))
        later = list(range(p + 1, m))
        if not later:
            continue
        successors = [order[q] for q in later]
        stage = compute[None, :, :] + costs.transfer[b, successors, None, : n + 1]
        totals = _combine(objective, acc[starts][None, :, None], stage)
        totals[:, :, n] = np.inf
        choice = np.argmin(totals, axis=1)
        values = np.take_along_axis(totals, choice[:, None, :], axis=1)[:, 0, :]
        for index, q in enumerate(later):
            better = values[index] < best[q]
            best[q][better] = values[index][better]
            parent[q][better, 0] = p
            parent[q][better, 1] = starts[choice[index]][better]
    if final_state is None:
        return np.inf, []
    p, start = final_state
    plan = [(order[p], start, n)]
    while start > 0:
        prev_p, prev_start = (int(v) for v in parent[p, start])
        plan.append((order[prev_p], prev_start, start))
        p, start = prev_p, prev_start
    plan.reverse()
    return final_value, plan


def search_orders(costs: CostModel, objective: str, budget_s: float) -> tuple[float, list[Stage]]:
    """Hill-climb over node orders (swap two nodes) from the fastest-first and the given orders."""
    m = costs.num_nodes
    deadline = time.perf_counter() + budget_s
    powers = [node.compute_power for node in costs.nodes]
    starts = [sorted(range(m), key=lambda a: -powers[a]), list(range(m))]
    best_value, best_plan = np.inf, []
    for order in starts:
        value, plan = ordered_plan(costs, order, objective)
        improved = True
        while improved and time.perf_counter() < deadline:
            improved = False
            for x in range(m):
                for y in range(x + 1, m):
                    if time.perf_counter() >= deadline:
                        break
                    trial = list(order)
                    trial[x], trial[y] = trial[y], trial[x]
                    trial_value, trial_plan = ordered_plan(costs, trial, objective)
                    if trial_value < value - 1e-12:
                        order, value, plan, improved = trial, trial_value, trial_plan, True
        if value < best_value:
            best_value, best_plan = value, plan
    return best_value, best_plan
