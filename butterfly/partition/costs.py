"""The cost model every strategy is judged by, as numpy tables.

A stage of layers ``[i, j)`` on node ``a`` followed by a stage on node ``b`` takes

    compute(a, i, j) = sum(compute_cost[i:j]) / compute_power[a]          (ms)
    transfer(a, b, j) = output_bytes[j - 1] / bandwidth(a→b) + latency(a→b)  (ms; 0 for the last stage)

and needs ``sum(memory_bytes[i:j]) <= memory_bytes[a]``. With the ``throughput`` objective
a plan's cost is its slowest stage (compute + outgoing transfer): a pipeline completes one
request per slowest-stage time. With ``latency`` it is the sum over stages.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..types import LayerInfo, NodeCapability, Topology

__all__ = ["CostModel"]


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
        return float(self.prefix_mem[j] - self.prefix_mem[i])
