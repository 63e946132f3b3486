"""Placement: the DP is optimal (checked against brute force), the strategies and errors behave."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from butterfly.errors import PartitionError
from butterfly.partition import estimate_quality, plan
from butterfly.partition.costs import CostModel
from butterfly.partition.dp import evaluate, exact_plan, ordered_plan, search_orders
from butterfly.types import LayerInfo, Link, NodeCapability, Topology
from tests.partition.strategies import instances


def compositions(n: int, parts: int) -> list[list[int]]:
    """Every way to cut n layers into `parts` non-empty contiguous stages (as cut points)."""
    return [[0, *cuts, n] for cuts in itertools.combinations(range(1, n), parts - 1)]


def brute_force(costs: CostModel, objective: str) -> float:
    best = math.inf
    for k in range(1, min(costs.num_nodes, costs.num_layers) + 1):
        for nodes in itertools.permutations(range(costs.num_nodes), k):
            for cuts in compositions(costs.num_layers, k):
                stages = [(nodes[s], cuts[s], cuts[s + 1]) for s in range(k)]
                best = min(best, evaluate(stages, costs, objective))
    return best


@st.composite
def cost_models(draw: st.DrawFn) -> CostModel:
    return CostModel(*draw(instances(max_layers=6, min_nodes=1, max_nodes=4)))


@settings(max_examples=1500, deadline=None)
@given(cost_models(), st.sampled_from(["throughput", "latency"]))
def test_exact_dp_equals_brute_force(costs: CostModel, objective: str) -> None:
    value, stages = exact_plan(costs, objective)
    expected = brute_force(costs, objective)
    if math.isinf(expected):
        assert math.isinf(value) and stages == []
        return
    assert value == pytest.approx(expected, rel=1e-9)
    # The plan it returns really has that value and covers every layer once, in order.
    assert evaluate(stages, costs, objective) == pytest.approx(value, rel=1e-9)
    assert stages[0][1] == 0 and stages[-1][2] == costs.num_layers
    assert all(stages[s][2] == stages[s + 1][1] for s in range(len(stages) - 1))
    assert len({s[0] for s in stages}) == len(stages)


@settings(max_examples=300, deadline=None)
@given(cost_models(), st.sampled_from(["throughput", "latency"]))
def test_ordered_dp_over_every_order_equals_the_exact_dp(costs: CostModel, objective: str) -> None:
    exact, _ = exact_plan(costs, objective)
    best = min(
        ordered_plan(costs, order, objective)[0]
        for order in itertools.permutations(range(costs.num_nodes))
    )
    assert best == pytest.approx(exact, rel=1e-9) if math.isfinite(exact) else math.isinf(best)


def _layers(n: int, cost: float = 10.0, memory: int = 100, output: int = 1000) -> list[LayerInfo]:
    return [LayerInfo(i, cost, memory, output) for i in range(n)]


def test_uniform_gives_equal_layer_counts_in_node_order() -> None:
    nodes = [NodeCapability(n, 1.0, 10**6) for n in "abc"]
    partitions = plan(_layers(8), nodes, "uniform")
    assert [(p.assigned_node, p.layer_range) for p in partitions] == [
        ("a", range(0, 3)),
        ("b", range(3, 6)),
        ("c", range(6, 8)),
    ]


def test_load_balanced_splits_work_in_proportion_to_speed() -> None:
    nodes = [NodeCapability("slow", 1.0, 10**6), NodeCapability("fast", 3.0, 10**6)]
    partitions = plan(_layers(12), nodes, "load_balanced")
    assert [p.layer_range for p in partitions] == [range(0, 3), range(3, 12)]


def test_topology_aware_leaves_a_node_idle_when_using_it_would_slow_the_pipeline() -> None:
    nodes = [
        NodeCapability("a", 1.0, 10**6),
        NodeCapability("b", 2.0, 10**6),
        NodeCapability("snail", 0.05, 10**6),
    ]
    partitions = plan(_layers(12), nodes, "topology_aware")
    assert "snail" not in {p.assigned_node for p in partitions}
    assert [(p.assigned_node, len(p.layer_range)) for p in partitions] == [("b", 8), ("a", 4)]


def test_topology_aware_avoids_a_slow_link() -> None:
    nodes = [NodeCapability(n, 1.0, 10**6) for n in "abc"]
    slow = Link(bandwidth_bytes_per_s=1e3, latency_s=0.0)  # 1 s per KB
    topology = Topology(links=(("a", "b", slow), ("b", "a", slow)), default=Link(1e9, 0.0))
    partitions = plan(_layers(6), nodes, "topology_aware", topology=topology)
    order = [p.assigned_node for p in partitions]
    assert all({x, y} != {"a", "b"} for x, y in itertools.pairwise(order))


def test_latency_objective_prefers_one_fast_node_over_a_pipeline() -> None:
    nodes = [NodeCapability("a", 1.0, 10**6), NodeCapability("b", 1.0, 10**6)]
    # One node: 40 ms. Split in two: stages of 20 ms + a 10 ms transfer, so the slowest stage
    # is 30 ms (better throughput) but a request takes 20 + 10 + 20 = 50 ms (worse latency).
    topology = Topology(default=Link(bandwidth_bytes_per_s=1e12, latency_s=0.01))
    assert (
        len(plan(_layers(4), nodes, "topology_aware", topology=topology, objective="latency")) == 1
    )
    assert (
        len(plan(_layers(4), nodes, "topology_aware", topology=topology, objective="throughput"))
        == 2
    )


def test_memory_is_a_hard_constraint() -> None:
    nodes = [NodeCapability("fast", 10.0, 250), NodeCapability("slow", 1.0, 10**6)]
    partitions = plan(_layers(6, memory=100), nodes, "topology_aware")
    fast = next(p for p in partitions if p.assigned_node == "fast")
    assert len(fast.layer_range) == 2  # 3 layers would be 300 bytes > 250


def test_heuristic_above_twelve_nodes_returns_a_valid_plan() -> None:
    nodes = [NodeCapability(f"n{i}", 1.0 + i % 3, 10**6) for i in range(16)]
    partitions = plan(_layers(100), nodes, "topology_aware")
    ranges = [p.layer_range for p in partitions]
    assert ranges[0].start == 0 and ranges[-1].stop == 100
    assert all(a.stop == b.start for a, b in itertools.pairwise(ranges))
    assert len({p.assigned_node for p in partitions}) == len(partitions)


def test_heuristic_finds_the_optimum_on_a_small_instance() -> None:
    nodes = [NodeCapability(f"n{i}", [1, 3, 2, 0.5][i], 10**6) for i in range(4)]
    costs = CostModel(_layers(10), nodes, Topology())
    assert search_orders(costs, "throughput", 1.0)[0] == pytest.approx(
        exact_plan(costs, "throughput")[0]
    )


def test_no_nodes_is_a_partition_error() -> None:
    with pytest.raises(PartitionError, match="no nodes available"):
        plan(_layers(3), [], "topology_aware")


def test_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(
        PartitionError,
        match="unknown strategy 'random'; known: uniform, load_balanced, topology_aware",
    ):
        plan(_layers(3), [NodeCapability("a", 1.0, 10**6)], "random")


def test_model_too_big_names_the_missing_bytes() -> None:
    nodes = [NodeCapability("a", 1.0, 150), NodeCapability("b", 1.0, 100)]
    with pytest.raises(
        PartitionError,
        match="needs 300 bytes of weights and the 2 nodes have 250 in total: 50 bytes missing",
    ):
        plan(_layers(3, memory=100), nodes, "topology_aware")


def test_layer_bigger_than_every_node_names_the_layer() -> None:
    layers = [*_layers(2, memory=10), LayerInfo(2, 1.0, 500, 10)]
    with pytest.raises(
        PartitionError,
        match="layer 2 alone needs 500 bytes and the largest node 'a' has 400: 100 bytes missing",
    ):
        plan(
            layers, [NodeCapability("a", 1.0, 400), NodeCapability("b", 1.0, 400)], "topology_aware"
        )


def test_uniform_that_overflows_a_node_names_it() -> None:
    nodes = [NodeCapability("a", 1.0, 150), NodeCapability("b", 1.0, 10**6)]
    with pytest.raises(
        PartitionError,
        match=r"layers 0\.\.1 need 200 bytes on node 'a', which has 150: 50 bytes missing",
    ):
        plan(_layers(4, memory=100), nodes, "uniform")


def test_estimate_quality_is_computed_from_the_plan() -> None:
    layers = [LayerInfo(0, 10, 2_000_000_000, 1_000_000), LayerInfo(1, 30, 1_000_000_000, 5)]
    nodes = [NodeCapability("a", 1.0, 10**10), NodeCapability("b", 2.0, 10**10)]
    topology = Topology(default=Link(bandwidth_bytes_per_s=1e8, latency_s=0.001))
    partitions = plan(layers, nodes, "uniform", topology=topology)
    quality = estimate_quality(partitions, layers, nodes, topology)
    # a: 10 ms compute + 1 MB / 100 MB/s (10 ms) + 1 ms latency = 21 ms; b: 30 / 2 = 15 ms.
    assert [p.estimated_time_ms for p in partitions] == pytest.approx([21.0, 15.0])
    assert quality.load_balance == pytest.approx(15 / 21)
    assert quality.communication_volume_mb == pytest.approx(1.0)
    assert quality.peak_memory_gb == pytest.approx(2.0)
    assert quality.estimated_latency_ms == pytest.approx(36.0)
    assert quality.estimated_throughput_rps == pytest.approx(1000 / 21)
