"""The partition service: stable cache keys, cache hits, plans wired into the coordinator."""

from __future__ import annotations

import subprocess
import sys

from butterfly.config import PartitionConfig
from butterfly.metrics import MetricsService
from butterfly.partition import PartitionService, cache_key
from butterfly.types import LayerInfo, Link, NodeCapability, Topology

LAYERS = [LayerInfo(i, 10.0 + i, 100, 1000) for i in range(6)]
NODES = [NodeCapability("a", 1.0, 10**6, "ws://a:1"), NodeCapability("b", 2.0, 10**6, "ws://b:1")]
TOPOLOGY = Topology(links=(("a", "b", Link(1e8, 0.001)),))

KEY_SCRIPT = """
from butterfly.partition import cache_key
from butterfly.types import LayerInfo, Link, NodeCapability, Topology
layers = [LayerInfo(i, 10.0 + i, 100, 1000) for i in range(6)]
nodes = [NodeCapability("a", 1.0, 10**6, "ws://a:1"), NodeCapability("b", 2.0, 10**6, "ws://b:1")]
print(cache_key(layers, nodes, Topology(links=(("a", "b", Link(1e8, 0.001)),)), "topology_aware", "throughput"))
"""


def test_cache_key_is_the_same_in_another_python_process() -> None:
    here = cache_key(LAYERS, NODES, TOPOLOGY, "topology_aware", "throughput")
    for _ in range(2):  # two fresh interpreters, two hash seeds
        there = subprocess.run(
            [sys.executable, "-c", KEY_SCRIPT], capture_output=True, text=True, check=True
        )
        assert there.stdout.strip() == here


def test_cache_key_changes_with_every_input() -> None:
    base = cache_key(LAYERS, NODES, TOPOLOGY, "topology_aware", "throughput")
    assert cache_key(LAYERS[:-1], NODES, TOPOLOGY, "topology_aware", "throughput") != base
    assert cache_key(LAYERS, NODES[:1], TOPOLOGY, "topology_aware", "throughput") != base
    assert cache_key(LAYERS, NODES, Topology(), "topology_aware", "throughput") != base
    assert cache_key(LAYERS, NODES, TOPOLOGY, "uniform", "throughput") != base
    assert cache_key(LAYERS, NODES, TOPOLOGY, "topology_aware", "latency") != base


def test_second_identical_plan_is_a_cache_hit_and_both_go_to_metrics() -> None:
    metrics = MetricsService()
    service = PartitionService(PartitionConfig(), metrics)
    first = service.plan(LAYERS, NODES, TOPOLOGY)
    second = service.plan(LAYERS, NODES, TOPOLOGY)
    assert second is first
    snapshot = metrics.snapshot()
    assert (snapshot.plan_cache_hits, snapshot.plan_cache_misses) == (1, 1)
    assert snapshot.last_planning_s > 0


def test_plan_lists_the_nodes_it_leaves_idle() -> None:
    nodes = [*NODES, NodeCapability("snail", 0.01, 10**6)]
    result = PartitionService(PartitionConfig(), MetricsService()).plan(LAYERS, nodes)
    assert result.idle == ("snail",)
    assert result.strategy == "topology_aware"
    assert result.quality.estimated_throughput_rps > 0
