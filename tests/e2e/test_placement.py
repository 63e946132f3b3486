"""Placement from measured costs, on real workers of different speed."""

from __future__ import annotations

import pytest
import torch

from butterfly import Butterfly, LocalCluster

pytestmark = pytest.mark.slow

SLOW = {"BUTTERFLY_TEST_SLOWDOWN": "4"}


def test_topology_aware_gives_the_slow_worker_less_work_than_uniform_does() -> None:
    with LocalCluster("tests.models:throttled", workers=3, worker_env=[{}, {}, SLOW]) as cluster:
        slow = cluster.processes[2].node_id
        with Butterfly.connect(cluster.addresses) as b:
            planned = b.cluster()
            x = torch.randn(2, 64)
            assert torch.equal(b.infer(x), x)  # the throttled layers pass their input through
        with Butterfly.connect(
            cluster.addresses, config={"partition": {"default_strategy": "uniform"}}
        ) as b:
            uniform = b.cluster()
    layers_on: dict[str, int] = {}
    for stage in planned.stages:  # a worker may hold several stages
        layers_on[stage.node_id] = layers_on.get(stage.node_id, 0) + len(stage.layers)
    assert planned.strategy == "topology_aware"
    assert layers_on.get(slow, 0) < min(n for node, n in layers_on.items() if node != slow)
    assert {len(s.layers) for s in uniform.stages} == {2, 3}
    assert planned.quality is not None and uniform.quality is not None
    # Uniform puts 2 layers (2 × 80 ms) on the slow worker; the plan leaves it 1 (80 ms), and
    # 4 + 3 layers of 20 ms on the fast ones: the measured costs predict about 2× the throughput.
    assert planned.quality.estimated_throughput_rps > 1.8 * uniform.quality.estimated_throughput_rps
