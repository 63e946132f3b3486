"""The partition service: plans for the coordinator, with a cache keyed by stable hashes.

Keys hash the canonical encoding of (layers, nodes, topology, strategy, objective) with
SHA-256, so they are the same in every process (Python's ``hash()`` is salted per process).
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Sequence

import attrs
import msgspec

from ..config import PartitionConfig
from ..metrics import MetricsSink
from ..metrics.events import PartitionCacheHit, PartitionCacheMiss, PartitionComputed
from ..types import LayerInfo, ModelPartition, NodeCapability, PartitionQuality, Topology
from .planner import estimate_quality, plan

__all__ = ["PartitionService", "Plan", "cache_key"]

_CACHE_SIZE = 64


@attrs.frozen
class Plan:
    partitions: tuple[ModelPartition, ...]
    quality: PartitionQuality
    strategy: str
    objective: str
    #: Nodes given to the planner that it left without a stage.
    idle: tuple[str, ...]


def cache_key(
    layers: Sequence[LayerInfo],
    nodes: Sequence[NodeCapability],
    topology: Topology,
    strategy: str,
    objective: str,
) -> str:
    """A hex SHA-256 of the planning inputs; equal inputs give equal keys in any process."""
    payload = msgspec.json.encode(
        [
            [[lyr.id, lyr.compute_cost, lyr.memory_bytes, lyr.output_bytes] for lyr in layers],
            [[n.node_id, n.compute_power, n.memory_bytes, n.address] for n in nodes],
            [[a, b, link.bandwidth_bytes_per_s, link.latency_s] for a, b, link in topology.links],
            [topology.default.bandwidth_bytes_per_s, topology.default.latency_s],
            strategy,
            objective,
        ]
    )
    return hashlib.sha256(payload).hexdigest()


class PartitionService:
    """Plans with the configured strategy and objective; remembers recent plans."""

    def __init__(self, config: PartitionConfig, metrics: MetricsSink) -> None:
        self.config = config
        self.metrics = metrics
        self._cache: collections.OrderedDict[str, Plan] = collections.OrderedDict()

    def plan(
        self,
        layers: Sequence[LayerInfo],
        nodes: Sequence[NodeCapability],
        topology: Topology | None = None,
    ) -> Plan:
        topology = topology or Topology()
        strategy, objective = self.config.default_strategy, self.config.objective
        key = cache_key(layers, nodes, topology, strategy, objective)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            self.metrics.emit(PartitionCacheHit(strategy))
            return cached
        self.metrics.emit(PartitionCacheMiss(strategy))
        start = time.perf_counter()
        partitions = plan(layers, nodes, strategy, topology=topology, objective=objective)
        used = {p.assigned_node for p in partitions}
        result = Plan(
            partitions=tuple(partitions),
            quality=estimate_quality(partitions, layers, nodes, topology),
            strategy=strategy,
            objective=objective,
            idle=tuple(n.node_id for n in nodes if n.node_id not in used),
        )
        self.metrics.emit(
            PartitionComputed(strategy, objective, time.perf_counter() - start, len(partitions))
        )
        self._cache[key] = result
        while len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return result
