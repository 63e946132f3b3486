"""Phases of epochs and requests: the transition table, and the phases a real run goes through."""

from __future__ import annotations

import pytest
import torch
import trio

from butterfly import AsyncButterfly
from butterfly.coordination import Phase, PhaseTracker
from butterfly.errors import CoordinationError
from butterfly.transport import MemoryNetwork
from tests.inmemory import FAST, start_workers


def tracker(log: list[Phase]) -> PhaseTracker:
    return PhaseTracker("request", 7, lambda scope, key, phase: log.append(phase))


def test_the_normal_path_is_reported_transition_by_transition() -> None:
    log: list[Phase] = []
    t = tracker(log)
    for phase in (Phase.ASSIGNMENT, Phase.COMPUTATION, Phase.AGGREGATION, Phase.COMMITMENT):
        t.advance(phase)
    assert log == [Phase.ASSIGNMENT, Phase.COMPUTATION, Phase.AGGREGATION, Phase.COMMITMENT]


def test_computation_may_go_back_to_assignment_when_a_worker_is_lost() -> None:
    t = tracker([])
    t.advance(Phase.ASSIGNMENT)
    t.advance(Phase.COMPUTATION)
    t.advance(Phase.ASSIGNMENT)
    assert t.phase is Phase.ASSIGNMENT


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ((), Phase.COMPUTATION),
        ((Phase.ASSIGNMENT,), Phase.AGGREGATION),
        ((Phase.ASSIGNMENT, Phase.COMPUTATION, Phase.AGGREGATION), Phase.ASSIGNMENT),
        (
            (Phase.ASSIGNMENT, Phase.COMPUTATION, Phase.AGGREGATION, Phase.COMMITMENT),
            Phase.ASSIGNMENT,
        ),
    ],
)
def test_an_illegal_transition_raises_and_changes_nothing(
    path: tuple[Phase, ...], illegal: Phase
) -> None:
    log: list[Phase] = []
    t = tracker(log)
    for phase in path:
        t.advance(phase)
    with pytest.raises(
        CoordinationError,
        match=f"phase transition failed: request 7 cannot go from .* to {illegal}",
    ):
        t.advance(illegal)
    assert t.phase is (path[-1] if path else None)
    assert log == list(path)


async def test_requests_and_epochs_go_through_their_phases() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=2)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            await b.infer_many([torch.zeros(1, 64) for _ in range(3)])
            phases = b.metrics().phase_transitions
            assert {k: phases[k] for k in phases if k.startswith("request:")} == {
                "request:assignment": 3,
                "request:computation": 3,
                "request:aggregation": 3,
                "request:commitment": 3,
            }
            assert phases["epoch:assignment"] == phases["epoch:computation"] == 1
            coordination = b._system.coordination
            assert coordination.epoch_phase(1) is Phase.COMPUTATION
        nursery.cancel_scope.cancel()
