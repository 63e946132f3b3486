"""Plans in which a node holds several non-adjacent stages.

Such a node runs all its stages on one device: their memory and their times add up (see
:mod:`.costs`). That helps when memory is uneven — a large embedding first and a large head
last fit together on the one node with the memory for both, while small nodes take the
middle — or when a fast node should take the cheap first and last layers. Consecutive
stages are never on the same node (they would be one stage).

The planner keeps its best plan with one stage per node unless one of two searches finds a
plan :func:`better` by more than rounding error, so a node is repeated only where that
strictly pays:

``exhaustive_plan``: every plan, that is every map from layers to nodes (``N^L`` of them
for N nodes and L layers), vectorised with numpy. Exact; :func:`.planner.plan` runs it when
there are at most ``EXHAUSTIVE_MAX_PLANS`` (≈ 15 ms at that size on 2 cores).

``wrap_search``: "wrap" plans, in which one node ``w`` holds a prefix ``[0, i)`` and a
suffix ``[j, L)`` of the layers and the middle ``[i, j)`` has one stage per node on the other
nodes. For a candidate ``(w, j)``, one run of :func:`.dp.ordered_plan` over
``[w, *middle order]`` on layers ``[0, j)`` — ``w``'s first-stage time raised by its suffix's
time and its memory lowered by its suffix's bytes, the last middle stage sending to ``w`` —
gives the optimal ``i`` and middle for that middle order. Every order of the other nodes is
tried when there are ``WRAP_ALL_ORDERS_MAX`` or fewer, which makes the search exact over wrap
plans; with more, only the order of the plan given (its nodes in order, then the unused
ones fastest first). Candidates are tried in increasing order of a lower bound on their
cost (``w`` computes at least layer 0 and the suffix; for latency every other layer takes at
least its fastest node's time), stopping at the first bound that cannot beat the best plan
so far — or at the deadline, after at least one candidate (while no plan fits in memory at
all, at a later deadline: a slower answer beats none). Each candidate costs O(N² · j²).
Plans where several nodes repeat, or where a node holds two middle stages, are only found
by ``exhaustive_plan``.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import numpy as np

from .costs import CostModel, Stage, merge_adjacent
from .dp import ordered_plan

__all__ = [
    "EXHAUSTIVE_MAX_PLANS",
    "WRAP_ALL_ORDERS_MAX",
    "better",
    "exhaustive_plan",
    "memory_tight",
    "wrap_search",
]

#: ``exhaustive_plan`` is used when there are at most this many plans (N^L).
EXHAUSTIVE_MAX_PLANS = 20_000
#: ``wrap_search`` tries every order of the middle nodes when there are at most this many.
WRAP_ALL_ORDERS_MAX = 3
# A plan with repeated nodes replaces a simpler one only when it is better by more than
# floating-point noise: the two are summed in different orders.
_RELATIVE_TOLERANCE = 1e-9


def better(value: float, than: float) -> bool:
    """Whether ``value`` beats ``than`` by more than rounding error (any finite value beats inf)."""
    if not np.isfinite(than):
        return bool(np.isfinite(value))
    return value < than - _RELATIVE_TOLERANCE * max(1.0, abs(than))


def _sequences(m: int, k: int) -> np.ndarray:
    """Every sequence of ``k`` nodes out of ``m`` with no node twice in a row, shape (S, k)."""
    seqs = np.arange(m)[:, None]
    for _ in range(k - 1):
        grown = np.concatenate(
            [np.repeat(seqs, m, axis=0), np.tile(np.arange(m), len(seqs))[:, None]], axis=1
        )
        seqs = grown[grown[:, -1] != grown[:, -2]]
    return seqs


def exhaustive_plan(
    costs: CostModel, objective: str, *, one_stage_per_node: bool = False
) -> tuple[float, list[Stage]]:
    """The optimal plan over all plans, nodes repeated or not; ``(inf, [])`` if none fits.

    Enumerates, for each number of stages k, every set of cut points and every sequence of
    nodes without two equal neighbours: ``N^L`` plans in all. Of equal plans, the one with
    the fewest stages wins. ``one_stage_per_node`` keeps only the sequences without any
    node twice (what :func:`.dp.exact_plan` searches, cheaper for a few layers).
    """
    n, m = costs.num_layers, costs.num_nodes
    best_value, best_plan = np.inf, []
    for k in range(1, n + 1):
        seqs = _sequences(m, k)  # (S, k)
        if one_stage_per_node:
            ordered = np.sort(seqs, axis=1)
            seqs = seqs[(ordered[:, 1:] != ordered[:, :-1]).all(axis=1)]
        if not len(seqs):
            break
        cuts = np.array([[0, *c, n] for c in itertools.combinations(range(1, n), k - 1)])
        stage_mem = costs.prefix_mem[cuts[:, 1:]] - costs.prefix_mem[cuts[:, :-1]]  # (C, k)
        times = np.empty((k, len(seqs), len(cuts)))
        for s in range(k):
            node, stop = seqs[:, s, None], cuts[None, :, s + 1]
            times[s] = costs.compute[node, cuts[None, :, s], stop]
            if s + 1 < k:
                times[s] += costs.transfer[node, seqs[:, s + 1, None], stop]
        loads = np.zeros((m, len(seqs), len(cuts)))
        used = np.zeros((m, len(seqs), len(cuts)))
        for s in range(k):
            mine = seqs[:, s] == np.arange(m)[:, None]  # (m, S)
            loads += np.where(mine[:, :, None], times[s][None], 0.0)
            used += mine[:, :, None] * stage_mem[None, None, :, s]
        values = loads.max(axis=0) if objective == "throughput" else times.sum(axis=0)
        values[(used > costs.capacity[:, None, None]).any(axis=0)] = np.inf
        index = np.unravel_index(int(np.argmin(values)), values.shape)
        if values[index] < best_value:
            seq, cut = seqs[index[0]], cuts[index[1]]
            best_value = float(values[index])
            best_plan = [(int(seq[s]), int(cut[s]), int(cut[s + 1])) for s in range(k)]
    if not best_plan:
        return np.inf, []
    return costs.plan_ms(best_plan, objective), best_plan


def memory_tight(costs: CostModel, stages: Sequence[Stage]) -> bool:
    """Whether memory shapes ``stages``: there are none, or some stage's node could not
    also hold the layer just before or just after it."""
    if not stages:
        return True
    n = costs.num_layers
    for a, i, j in stages:
        if i > 0 and costs.memory(i - 1, j) > costs.capacity[a]:
            return True
        if j < n and costs.memory(i, j + 1) > costs.capacity[a]:
            return True
    return False


def _middle_orders(costs: CostModel, w: int, stages: Sequence[Stage]) -> list[list[int]]:
    others = [a for a in range(costs.num_nodes) if a != w]
    if len(others) <= WRAP_ALL_ORDERS_MAX:
        return [list(order) for order in itertools.permutations(others)]
    used = list(dict.fromkeys(a for a, _, _ in stages if a != w))
    rest = sorted(set(others) - set(used), key=lambda a: (-costs.nodes[a].compute_power, a))
    return [used + rest]


def wrap_search(
    costs: CostModel,
    objective: str,
    incumbent: tuple[float, list[Stage]],
    deadline: float,
    *,
    deadline_if_none: float | None = None,
) -> tuple[float, list[Stage]]:
    """The best of ``incumbent`` and the wrap plans searched until ``deadline`` (module doc).

    At least the most promising candidate is tried, whatever the deadline.
    While no plan fits in memory (``incumbent`` is ``(inf, [])`` and no wrap plan fitted
    yet), the search goes on until ``deadline_if_none`` instead, when that is later: a
    slower answer is better than none. Returns ``incumbent`` itself unless a wrap plan is
    :func:`better`.
    """
    n, m = costs.num_layers, costs.num_nodes
    best_value, best_plan = incumbent
    if deadline_if_none is None or deadline_if_none < deadline:
        deadline_if_none = deadline
    layer_ms = costs.compute[:, np.arange(n), np.arange(1, n + 1)]  # (m, n)
    if n < 3 or m < 2:
        return incumbent  # no room for a wrap
    if costs.capacity.sum() < costs.prefix_mem[n] or not np.isfinite(layer_ms.min(axis=0)).all():
        return incumbent  # the nodes together lack the memory, or some layer fits none
    # Lower bounds on a wrap plan on w with suffix [j, n): w computes at least layer 0 and
    # the suffix; with latency, every other layer takes at least its fastest node's time.
    ends = np.arange(2, n)  # j
    bounds = costs.compute[:, ends, n] + costs.compute[:, 0, 1, None]  # (m, n - 2)
    if objective == "latency":
        fastest = np.concatenate([[0.0], np.cumsum(layer_ms.min(axis=0))])
        bounds = bounds + (fastest[ends] - fastest[1])[None, :]
    suffix_bytes = costs.prefix_mem[n] - costs.prefix_mem[ends]
    fits = costs.memory(0, 1) + suffix_bytes[None, :] <= costs.capacity[:, None]
    ws, js = np.nonzero(fits & np.isfinite(bounds))
    candidates = sorted(zip(bounds[ws, js].tolist(), ws.tolist(), (js + 2).tolist(), strict=True))
    for bound, w, j in candidates:
        if not better(bound, best_value):
            break  # sorted: no later candidate can beat the best either
        # w's first stage [0, i) carries its suffix's time and leaves memory for it.
        room = costs.prefix_mem[: j + 1] + costs.memory(j, n) <= costs.capacity[w]
        head = np.where(room, costs.compute[w, 0, : j + 1] + costs.compute[w, j, n], np.inf)
        for middle in _middle_orders(costs, w, incumbent[1]):
            _, prefix = ordered_plan(costs, [w, *middle], objective, stop=j, head=head, tail=w)
            if not prefix:
                continue
            plan = merge_adjacent([*prefix, (w, j, n)])
            value = costs.plan_ms(plan, objective)
            if better(value, best_value):
                best_value, best_plan = value, plan
        if time.perf_counter() >= (deadline if best_plan else deadline_if_none):
            break
    if best_plan is incumbent[1]:
        return incumbent
    return best_value, best_plan
