"""The cost model every strategy is judged by, as numpy tables.

A stage of layers ``[i, j)`` on node ``a`` followed by a stage on node ``b`` takes

    compute(a, i, j) = sum(compute_cost[i:j]) / compute_power[a]          (ms)
    transfer(a, b, j) = output_bytes[j - 1] / bandwidth(a→b) + latency(a→b)  (ms; 0 for the last stage)

A node may hold several (non-adjacent) stages of one plan; they share its device, so its
memory use is the sum over its stages, which must fit ``memory_bytes[a]``, and its load is
the sum of its stages' times (each with its outgoing transfer). With the ``throughput``
objective a plan's cost is its busiest node's load: a pipeline completes one request per
that time (with one stage per node, the slowest stage). With ``latency`` it is the sum of
every stage's time, whichever nodes hold them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..types import LayerInfo, NodeCapability, Topology

__all__ = ["CostModel", "Stage", "merge_adjacent"]

Stage = tuple[int, int, int]  # (node index, first layer, stop layer)


def merge_adjacent(stages: Sequence[Stage]) -> list[Stage]:
    """``stages`` with consecutive stages on the same node joined into one.

    The cost is unchanged: the joined stages' compute adds up and nothing is sent between them.
    """
    merged: list[Stage] = []
    for a, i, j in stages:
        if merged and merged[-1][0] == a:
            merged[-1] = (a, merged[-1][1], j)
        else:
            merged.append((a, i, j))
    return merged


class CostModel:
    """Precomputed stage and transfer times for ``layers`` on ``nodes``."""

    def __init__(
        self, layers: Sequence[LayerInfo], nodes: Sequence[NodeCapability], topology: Topology
    ) -> None:
        self.layers = list(layers)
        self.nodes = list(nodes)
        self.topology = topology
        n, m = len(self.layers), len(self.nodes)
        self.num_layers, self.num_nodes = n, m
        cost = np.array([layer.compute_cost for layer in self.layers], dtype=np.float64)
        mem = np.array([layer.memory_bytes for layer in self.layers], dtype=np.float64)
        self.prefix_cost = np.concatenate([[0.0], np.cumsum(cost)])
        self.prefix_mem = np.concatenate([[0.0], np.cumsum(mem)])
        self.output_bytes = np.array(
            [layer.output_bytes for layer in self.layers], dtype=np.float64
        )
        power = np.array([node.compute_power for node in self.nodes], dtype=np.float64)
        capacity = np.array([node.memory_bytes for node in self.nodes], dtype=np.float64)
        #: capacity[a]: bytes of layer memory node a can hold, over all of its stages.
        self.capacity = capacity
        # work[i, j] = cost of layers [i, j); inf where j <= i.
        span = self.prefix_cost[None, :] - self.prefix_cost[:, None]
        weight = self.prefix_mem[None, :] - self.prefix_mem[:, None]
        valid = np.triu(np.ones((n + 1, n + 1), dtype=bool), k=1)
        #: compute[a, i, j]: ms of layers [i, j) on node a; inf if empty or over a's memory.
        self.compute = np.where(
            valid[None] & (weight[None] <= capacity[:, None, None]),
            span[None] / power[:, None, None],
            np.inf,
        )
        #: transfer[a, b, j]: ms to send the output of layer j-1 from a to b (j = 1..n-1).
        self.transfer = np.zeros((m, m, n + 1))
        for a, na in enumerate(self.nodes):
            for b, nb in enumerate(self.nodes):
                if a != b:
                    link = topology.link(na.node_id, nb.node_id)
                    self.transfer[a, b, 1:n] = (
                        self.output_bytes[: n - 1] / link.bandwidth_bytes_per_s + link.latency_s
                    ) * 1000

    def stage_ms(self, a: int, i: int, j: int, b: int | None) -> float:
        """Time of stage ``[i, j)`` on node ``a`` sending to node ``b`` (``None``: last stage)."""
        t = float(self.compute[a, i, j])
        return t if b is None else t + float(self.transfer[a, b, j])

    def memory(self, i: int, j: int) -> float:
        """Bytes of weights of layers ``[i, j)``."""
        return float(self.prefix_mem[j] - self.prefix_mem[i])

    def stage_times(self, stages: Sequence[Stage]) -> list[float]:
        """Each stage's time in ``stages`` (a whole plan, in order), its outgoing transfer included."""
        return [
            self.stage_ms(a, i, j, stages[s + 1][0] if s + 1 < len(stages) else None)
            for s, (a, i, j) in enumerate(stages)
        ]

    def node_loads(self, stages: Sequence[Stage]) -> dict[int, float]:
        """Per node of the plan: the summed time of its stages (what it does per request)."""
        loads: dict[int, float] = {}
        for (a, _, _), t in zip(stages, self.stage_times(stages), strict=True):
            loads[a] = loads.get(a, 0.0) + t
        return loads

    def node_memory(self, stages: Sequence[Stage]) -> dict[int, float]:
        """Per node of the plan: the summed weight bytes of its stages."""
        used: dict[int, float] = {}
        for a, i, j in stages:
            used[a] = used.get(a, 0.0) + self.memory(i, j)
        return used

    def plan_ms(self, stages: Sequence[Stage], objective: str) -> float:
        """The plan's cost under ``objective``; ``inf`` if a node's stages overflow its memory.

        ``throughput``: the busiest node's load (the pipeline's period); ``latency``: the
        sum of all stage times.
        """
        used = self.node_memory(stages)
        if any(bytes_ > self.capacity[a] for a, bytes_ in used.items()):
            return float("inf")
        if objective == "throughput":
            return max(self.node_loads(stages).values())
        return sum(self.stage_times(stages))
