"""Placement with a node holding several non-adjacent stages: optimal (checked against brute
force), chosen only when strictly better, and scored per node."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from butterfly.errors import PartitionError
from butterfly.partition import estimate_quality, plan
from butterfly.partition.costs import CostModel, Stage
from butterfly.partition.dp import exact_plan
from butterfly.partition.repeats import exhaustive_plan, wrap_search
from butterfly.types import LayerInfo, ModelPartition, NodeCapability, Topology
from tests.partition.strategies import instances

# The default link: 1 GB/s and 0.1 ms, so 1 MB of activations takes 1.1 ms to send.
MB = 1_000_000


def cost_of(stages: list[Stage], costs: CostModel, objective: str) -> float:
    """From first principles: the busiest node's summed stage times, or the sum of all stage
    times; inf when a node's stages need more memory than it has."""
    times = [
        costs.stage_ms(a, i, j, stages[s + 1][0] if s + 1 < len(stages) else None)
        for s, (a, i, j) in enumerate(stages)
    ]
    used = {a for a, _, _ in stages}
    for a in used:
        held = sum(costs.memory(i, j) for b, i, j in stages if b == a)
        if held > costs.nodes[a].memory_bytes:
            return math.inf
    if objective == "latency":
        return sum(times)
    node_of = [a for a, _, _ in stages]
    return max(sum(t for b, t in zip(node_of, times, strict=True) if b == a) for a in used)


def stages_of(assignment: tuple[int, ...]) -> list[Stage]:
    """The plan that gives layer l to node assignment[l]: runs of one node are one stage."""
    stages: list[Stage] = []
    start = 0
    for a, run in itertools.groupby(assignment):
        stop = start + len(list(run))
        stages.append((a, start, stop))
        start = stop
    return stages


def every_plan(costs: CostModel) -> list[list[Stage]]:
    """Every plan: one per map from layers to nodes (N^L of them)."""
    return [
        stages_of(assignment)
        for assignment in itertools.product(range(costs.num_nodes), repeat=costs.num_layers)
    ]


def wrap_plans(costs: CostModel) -> list[list[Stage]]:
    """Every plan with one stage per node, and every w:[0,i) + others:[i,j) + w:[j,L) plan."""
    n, m = costs.num_layers, costs.num_nodes
    plans = []
    for k in range(1, min(m, n) + 1):
        for nodes in itertools.permutations(range(m), k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                bounds = [0, *cuts, n]
                plans.append([(nodes[s], bounds[s], bounds[s + 1]) for s in range(k)])
    for w in range(m):
        others = [a for a in range(m) if a != w]
        for i, j in itertools.combinations(range(1, n), 2):
            for k in range(1, min(len(others), j - i) + 1):
                for nodes in itertools.permutations(others, k):
                    for cuts in itertools.combinations(range(i + 1, j), k - 1):
                        bounds = [i, *cuts, j]
                        middle = [(nodes[s], bounds[s], bounds[s + 1]) for s in range(k)]
                        plans.append([(w, 0, i), *middle, (w, j, n)])
    return plans


def planned_cost(partitions: list[ModelPartition], costs: CostModel, objective: str) -> float:
    index = {node.node_id: a for a, node in enumerate(costs.nodes)}
    stages = [(index[p.assigned_node], p.layer_range.start, p.layer_range.stop) for p in partitions]
    return cost_of(stages, costs, objective)


@settings(max_examples=400, deadline=None)
@given(
    instances(max_layers=6, min_nodes=1, max_nodes=3), st.sampled_from(["throughput", "latency"])
)
def test_planner_equals_brute_force_over_every_plan_with_nodes_repeated(
    instance: tuple[list[LayerInfo], list[NodeCapability], Topology], objective: str
) -> None:
    layers, nodes, topology = instance
    costs = CostModel(layers, nodes, topology)
    expected = min(cost_of(stages, costs, objective) for stages in every_plan(costs))
    if math.isinf(expected):
        with pytest.raises(PartitionError, match="cannot place the model"):
            plan(layers, nodes, "topology_aware", topology=topology, objective=objective)
        return
    partitions = plan(layers, nodes, "topology_aware", topology=topology, objective=objective)
    assert planned_cost(partitions, costs, objective) == pytest.approx(expected, rel=1e-9)
    # Stages cover every layer once, in order, with ids in order and never the same node twice
    # in a row.
    assert [p.id for p in partitions] == list(range(len(partitions)))
    assert partitions[0].layer_range.start == 0 and partitions[-1].layer_range.stop == len(layers)
    assert all(x.layer_range.stop == y.layer_range.start for x, y in itertools.pairwise(partitions))
    assert all(x.assigned_node != y.assigned_node for x, y in itertools.pairwise(partitions))


@settings(max_examples=300, deadline=None)
@given(
    instances(max_layers=6, min_nodes=2, max_nodes=3), st.sampled_from(["throughput", "latency"])
)
def test_planner_repeats_a_node_only_when_that_is_strictly_better(
    instance: tuple[list[LayerInfo], list[NodeCapability], Topology], objective: str
) -> None:
    layers, nodes, topology = instance
    costs = CostModel(layers, nodes, topology)
    one_stage_each, _ = exact_plan(costs, objective)
    try:
        partitions = plan(layers, nodes, "topology_aware", topology=topology, objective=objective)
    except PartitionError:
        return
    repeated = len({p.assigned_node for p in partitions}) < len(partitions)
    if repeated:
        assert planned_cost(partitions, costs, objective) < one_stage_each
    else:
        assert planned_cost(partitions, costs, objective) == pytest.approx(one_stage_each, rel=1e-9)


@settings(max_examples=300, deadline=None)
@given(
    instances(max_layers=7, min_nodes=2, max_nodes=4), st.sampled_from(["throughput", "latency"])
)
def test_wrap_search_equals_brute_force_over_wrap_plans(
    instance: tuple[list[LayerInfo], list[NodeCapability], Topology], objective: str
) -> None:
    layers, nodes, topology = instance
    costs = CostModel(layers, nodes, topology)
    expected = min(cost_of(stages, costs, objective) for stages in wrap_plans(costs))
    value, stages = wrap_search(costs, objective, exact_plan(costs, objective), math.inf)
    if math.isinf(expected):
        assert math.isinf(value) and stages == []
        return
    assert value == pytest.approx(expected, rel=1e-9)
    assert cost_of(stages, costs, objective) == pytest.approx(value, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    instances(max_layers=6, min_nodes=1, max_nodes=4), st.sampled_from(["throughput", "latency"])
)
def test_enumeration_with_one_stage_per_node_equals_the_exact_dp(
    instance: tuple[list[LayerInfo], list[NodeCapability], Topology], objective: str
) -> None:
    costs = CostModel(*instance)
    value, stages = exhaustive_plan(costs, objective, one_stage_per_node=True)
    exact, _ = exact_plan(costs, objective)
    if math.isinf(exact):
        assert math.isinf(value) and stages == []
        return
    assert value == pytest.approx(exact, rel=1e-9)
    assert len({a for a, _, _ in stages}) == len(stages)


def _ends_heavy(middle: int) -> list[LayerInfo]:
    """An embedding and a head of 60 bytes around `middle` blocks of 10 bytes; 1 MB outputs."""
    return [
        LayerInfo(0, 1.0, 60, MB),
        *(LayerInfo(i, 10.0, 10, MB) for i in range(1, middle + 1)),
        LayerInfo(middle + 1, 1.0, 60, MB),
    ]


def test_the_only_node_with_room_for_embedding_and_head_holds_both_ends() -> None:
    # Only "big" can hold a 60-byte end layer, but not both ends and the middle (160 bytes),
    # so no plan with one stage per node fits.
    layers = _ends_heavy(4)
    nodes = [NodeCapability("big", 1.0, 130), NodeCapability("small", 4.0, 50)]
    partitions = plan(layers, nodes, "topology_aware")
    assert [(p.assigned_node, p.layer_range) for p in partitions] == [
        ("big", range(0, 1)),
        ("small", range(1, 5)),
        ("big", range(5, 6)),
    ]
    # big: 1 ms + 1.1 ms to send, then 1 ms; small: 40 / 4 = 10 ms + 1.1 ms to send.
    assert [p.estimated_time_ms for p in partitions] == pytest.approx([2.1, 11.1, 1.0])
    quality = estimate_quality(partitions, layers, nodes)
    assert quality.estimated_throughput_rps == pytest.approx(1000 / 11.1)
    assert quality.estimated_latency_ms == pytest.approx(14.2)


def test_a_fast_node_takes_both_cheap_ends_when_that_balances_the_pipeline() -> None:
    layers = [LayerInfo(0, 2.0, 1, 0), LayerInfo(1, 6.0, 1, 0), LayerInfo(2, 2.0, 1, 0)]
    nodes = [NodeCapability("a", 1.0, 100), NodeCapability("b", 1.5, 100)]
    # With one stage per node the best is a:[0] b:[1, 2]: b takes 8 / 1.5 = 5.33 ms.
    assert exact_plan(CostModel(layers, nodes, Topology()), "throughput")[0] == pytest.approx(
        8 / 1.5
    )
    partitions = plan(layers, nodes, "topology_aware")
    assert [(p.assigned_node, p.layer_range) for p in partitions] == [
        ("a", range(0, 1)),
        ("b", range(1, 2)),
        ("a", range(2, 3)),
    ]
    # a: 2 ms + 0.1 ms link latency + 2 ms = 4.1 ms; b: 6 / 1.5 = 4 ms + 0.1 ms = 4.1 ms.
    quality = estimate_quality(partitions, layers, nodes)
    assert 1000 / quality.estimated_throughput_rps == pytest.approx(4.1)
    assert quality.load_balance == pytest.approx(1.0)


def test_a_tie_between_a_repeated_node_and_one_stage_per_node_goes_to_one_stage_per_node() -> None:
    # a:[0] b:[1] a:[2] and a:[0] b:[1] c:[2] both take 10.1 ms (b's 10 ms + 0.1 ms to send).
    layers = [LayerInfo(0, 1.0, 1, 0), LayerInfo(1, 10.0, 1, 0), LayerInfo(2, 1.0, 1, 0)]
    nodes = [NodeCapability(name, 1.0, 100) for name in "abc"]
    partitions = plan(layers, nodes, "topology_aware")
    assert [p.assigned_node for p in partitions] == ["a", "b", "c"]
    assert partitions[1].estimated_time_ms == pytest.approx(10.1)


def test_a_wrap_is_found_where_there_are_too_many_plans_to_try_them_all() -> None:
    # 3^20 plans. big can hold both 600-byte ends and one 100-byte block (1300 bytes); s1 and
    # s2 hold at most ten blocks each, so the 18 blocks need both of them, nine on one.
    layers = [
        LayerInfo(0, 1.0, 600, MB),
        *(LayerInfo(i, 10.0, 100, MB) for i in range(1, 19)),
        LayerInfo(19, 1.0, 600, MB),
    ]
    nodes = [
        NodeCapability("big", 1.0, 1300),
        NodeCapability("s1", 4.0, 1000),
        NodeCapability("s2", 4.0, 1000),
    ]
    partitions = plan(layers, nodes, "topology_aware")
    assert partitions[0].assigned_node == partitions[-1].assigned_node == "big"
    # The busier of s1 and s2: nine blocks, 90 / 4 = 22.5 ms, + 1.1 ms to send.
    quality = estimate_quality(partitions, layers, nodes)
    assert 1000 / quality.estimated_throughput_rps == pytest.approx(23.6)


def test_a_wrap_for_latency_takes_the_fewest_transfers_that_fit() -> None:
    layers = [
        LayerInfo(0, 1.0, 600, MB),
        *(LayerInfo(i, 10.0, 100, MB) for i in range(1, 19)),
        LayerInfo(19, 1.0, 600, MB),
    ]
    nodes = [
        NodeCapability("big", 1.0, 1300),
        NodeCapability("s1", 4.0, 1000),
        NodeCapability("s2", 4.0, 1000),
    ]
    partitions = plan(layers, nodes, "topology_aware", objective="latency")
    # big: both ends, 1 + 1 ms; s1 and s2: all 18 blocks, 180 / 4 = 45 ms; three 1.1 ms sends.
    assert [p.assigned_node for p in partitions] in (
        ["big", "s1", "s2", "big"],
        ["big", "s2", "s1", "big"],
    )
    assert estimate_quality(partitions, layers, nodes).estimated_latency_ms == pytest.approx(50.3)


def test_estimate_quality_sums_the_stages_a_node_holds() -> None:
    layers = _ends_heavy(4)
    nodes = [NodeCapability("big", 1.0, 10**6), NodeCapability("small", 4.0, 10**6)]
    partitions = [
        ModelPartition(0, range(0, 1), "big", 0.0),
        ModelPartition(1, range(1, 5), "small", 0.0),
        ModelPartition(2, range(5, 6), "big", 0.0),
    ]
    quality = estimate_quality(partitions, layers, nodes)
    # big: 2.1 + 1.0 ms and 60 + 60 bytes; small: 11.1 ms and 40 bytes; two 1 MB boundaries.
    assert quality.load_balance == pytest.approx(3.1 / 11.1)
    assert quality.peak_memory_gb == pytest.approx(120 / 1e9)
    assert quality.communication_volume_mb == pytest.approx(2.0)
    assert quality.estimated_latency_ms == pytest.approx(14.2)
    assert quality.estimated_throughput_rps == pytest.approx(1000 / 11.1)


def test_estimate_quality_counts_no_transfer_between_adjacent_stages_on_one_node() -> None:
    layers = _ends_heavy(1)
    nodes = [NodeCapability("a", 1.0, 10**6)]
    partitions = [
        ModelPartition(0, range(0, 2), "a", 0.0),
        ModelPartition(1, range(2, 3), "a", 0.0),
    ]
    quality = estimate_quality(partitions, layers, nodes)
    assert quality.communication_volume_mb == 0.0
    assert quality.estimated_latency_ms == pytest.approx(12.0)


def test_model_too_big_even_for_repeated_nodes_names_the_missing_bytes() -> None:
    layers = _ends_heavy(4)  # 160 bytes
    nodes = [NodeCapability("big", 1.0, 100), NodeCapability("small", 4.0, 50)]
    with pytest.raises(
        PartitionError,
        match="needs 160 bytes of weights and the 2 nodes have 150 in total: 10 bytes missing",
    ):
        plan(layers, nodes, "topology_aware")


def test_layers_that_fit_in_total_but_not_together_are_a_partition_error() -> None:
    # Each node holds one 60-byte layer but not two: three layers need three nodes.
    layers = [LayerInfo(i, 1.0, 60, 10) for i in range(3)]
    nodes = [NodeCapability("a", 1.0, 100), NodeCapability("b", 1.0, 100)]
    with pytest.raises(
        PartitionError,
        match=r"needs 180 of the 200 bytes the nodes have, but the planner found no split",
    ):
        plan(layers, nodes, "topology_aware")
