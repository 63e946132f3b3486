"""Verification against lying workers, coordinator and workers in one process.

Real torch compute and the real services over the in-memory transport; a liar is a
worker whose stages lie on their output (``tests.byzantine``). The e2e tests repeat the
essentials with worker processes.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import pytest
import torch
import trio

import butterfly.scheduling.service as scheduling_service
from butterfly import AsyncButterfly
from butterfly.config import load_config
from butterfly.errors import ApiError, ByzantineError, PartitionError
from butterfly.transport import MemoryNetwork
from butterfly.types import WorkerState
from butterfly.worker import WorkerService
from tests.byzantine import LIES, Liar, LyingSource
from tests.inmemory import FAST, acquainted, local_forward
from tests.waiting import wait_until

MODEL = "butterfly.model.zoo:mlp"


def verifying(mode: str = "replicate", **more: Any) -> dict[str, Any]:
    return {**FAST, "coordination": {**FAST["coordination"], "verification": mode, **more}}


async def start(
    nursery: trio.Nursery,
    net: MemoryNetwork,
    n: int,
    liars: Mapping[int, Liar] | None = None,
) -> list[WorkerService]:
    """Workers ``w0``..``w{n-1}``; those in ``liars`` lie on every stage they compute."""
    workers = []
    for i in range(n):
        source = LyingSource(MODEL, profile=False, liar=(liars or {}).get(i))
        worker = WorkerService(
            source,
            transport=net,
            listen=f"mem://w{i}",
            peers=("mem://w0",) if i else (),
            node_id=f"w{i}",
            config=load_config(FAST),
        )
        await nursery.start(worker.run)
        workers.append(worker)
    await acquainted(workers)
    return workers


def inputs(n: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 64, generator=generator) for _ in range(n)]


def quarantined(b: AsyncButterfly) -> list[str]:
    return sorted(w.node_id for w in b.cluster().workers if w.state is WorkerState.QUARANTINED)


async def test_replicate_runs_each_stage_on_three_workers_and_answers_the_local_forward() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start(nursery, net, 6)
        config = verifying(max_byzantine=1)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            cluster = b.cluster()
            assert [(s.index, s.node_id) for s in cluster.stages] == [(0, "w0"), (1, "w3")]
            assert [(r.index, r.node_id) for r in cluster.replicas] == [
                (0, "w1"),
                (0, "w2"),
                (1, "w4"),
                (1, "w5"),
            ]
            for x in inputs(5):
                torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
            assert b.metrics().stages_verified == {1: 10}
            assert quarantined(b) == []
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("agreement", ["exact", "tolerance"])
@pytest.mark.parametrize("lie", LIES)
async def test_a_lying_replica_is_outvoted_caught_and_quarantined(lie: str, agreement: str) -> None:
    net = MemoryNetwork()
    liar = Liar(lie)
    async with trio.open_nursery() as nursery:
        # Four workers: three replicas of the one stage, and a spare for the re-plan.
        await start(nursery, net, 4, liars={1: liar})
        config = verifying(max_byzantine=1, agreement=agreement)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            assert [r.node_id for r in b.cluster().replicas] == ["w1", "w2"]
            for x in inputs(12):
                torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
                if liar.lies:
                    break
            assert liar.lies == 1  # quarantined after its first wrong answer
            assert quarantined(b) == ["w1"]
            await wait_until(
                lambda: "w1" not in {r.node_id for r in b.cluster().replicas}, what="a re-plan"
            )
            assert [r.node_id for r in b.cluster().replicas] == ["w2", "w3"]
            for x in inputs(3, seed=1):
                torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
            failures = [e for e in b.metrics().node_failures.items()]
            assert failures == [("byzantine", 1)]
            assert b.metrics().quarantines == 1
            assert b.metrics().replica_disagreements == {"agreed": 1}
        nursery.cancel_scope.cancel()


async def test_a_lying_first_holder_is_outvoted_and_the_output_is_collected_from_a_replica() -> (
    None
):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start(nursery, net, 3, liars={0: Liar("sign")})
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=verifying()) as b:
            x = inputs(1)[0]
            torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
            assert b.metrics().stages_verified == {2: 1}  # the output collected: 2 rounds
            assert quarantined(b) == ["w0"]
            assert b.metrics().node_failures == {"byzantine": 1}
            evidence = next(w.reason for w in b.cluster().workers if w.node_id == "w0")
            assert evidence.startswith(
                "request 1 stage 0 (layers 0..5): its output (float32[2, 64]"
            )
            assert "contradicts the one w1, w2 agreed on" in evidence
            assert evidence.endswith("top-k values differ by up to 2 (relative; allowed 0.002)")
        nursery.cancel_scope.cancel()


async def test_with_two_honest_replicas_left_a_lie_fails_the_request_instead_of_answering() -> None:
    net = MemoryNetwork()
    liar = Liar("every_10th")
    async with trio.open_nursery() as nursery:
        # Three workers, one caught and quarantined: two replicas detect, cannot outvote.
        await start(nursery, net, 3, liars={2: liar, 1: Liar("zeros")})
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=verifying()) as b:
            x = inputs(1)[0]
            torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
            assert quarantined(b) == ["w1"]
            await wait_until(lambda: len(b.cluster().replicas) == 1, what="a re-plan")
            answered = 0
            with pytest.raises(ByzantineError, match=r"no 2 of its 2 replicas agree"):
                for x in inputs(20, seed=2):
                    torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
                    answered += 1
            assert answered == 8  # the liar's 10th stage output (its first was request 1's)
            assert b.metrics().replica_disagreements == {"agreed": 1, "no_quorum": 1}
            x = inputs(1, seed=3)[0]
            torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
        nursery.cancel_scope.cancel()


async def test_three_replicas_that_all_disagree_fail_the_request_with_byzantine_error() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        liars = {0: Liar("sign"), 1: Liar("zeros"), 2: Liar("scale")}
        await start(nursery, net, 3, liars=liars)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=verifying()) as b:
            with pytest.raises(ByzantineError) as caught:
                await b.infer(inputs(1)[0])
            message = str(caught.value)
            assert "stage 0 (layers 0..5) of request 1: no 2 of its 3 replicas agree" in message
            assert all(f"w{i}: digest" not in message for i in range(3))  # tolerance: proofs
            assert "w0: float32[2, 64] mean" in message
            assert quarantined(b) == []  # nobody can be blamed
            assert b.metrics().replica_disagreements == {"no_quorum": 1}
        nursery.cancel_scope.cancel()


async def test_two_colluding_replicas_of_three_outvote_the_honest_one_beyond_the_guarantee() -> (
    None
):
    """f = 1 tolerates one liar. Two that tell the same lie are a quorum: their output is
    accepted and the honest replica is quarantined (docs/verification.md says so)."""
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start(nursery, net, 3, liars={1: Liar("sign"), 2: Liar("sign")})
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=verifying()) as b:
            x = inputs(1)[0]
            torch.testing.assert_close(await b.infer(x), -local_forward(x), rtol=0, atol=0)
            assert quarantined(b) == ["w0"]
        nursery.cancel_scope.cancel()


async def test_release_lets_a_quarantined_worker_be_placed_again() -> None:
    net = MemoryNetwork()
    liar = Liar("every_10th")
    async with trio.open_nursery() as nursery:
        await start(nursery, net, 3, liars={1: liar})
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=verifying()) as b:
            for x in inputs(10):
                torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
            assert quarantined(b) == ["w1"]
            w1 = next(w for w in b.cluster().workers if w.node_id == "w1")
            assert w1.reason.startswith("request 10 stage 0")
            assert "worker w1 mem://w1 quarantined (request 10 stage 0" in str(b.cluster())
            with pytest.raises(
                ApiError, match=r"worker 'w2' is not quarantined \(quarantined: w1\)"
            ):
                b.release("w2")
            b.release("w1")
            await wait_until(lambda: len(b.cluster().replicas) == 2, what="w1 placed again")
            assert quarantined(b) == []
            for x in inputs(3, seed=1):
                torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
        nursery.cancel_scope.cancel()


async def test_a_bad_input_fails_with_its_own_error_and_blames_no_replica() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start(nursery, net, 3)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=verifying()) as b:
            with pytest.raises(Exception) as caught:
                await b.infer(torch.full((1, 64), float("nan")).to(torch.float64))
            assert not isinstance(caught.value, ByzantineError)
            assert quarantined(b) == []
            x = inputs(1)[0]
            torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
        nursery.cancel_scope.cancel()


async def test_replicate_with_fewer_workers_than_a_quorum_is_refused_naming_the_count() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start(nursery, net, 1)
        with pytest.raises(PartitionError) as caught:
            async with AsyncButterfly.connect(["mem://w0"], transport=net, config=verifying()):
                pass
        assert str(caught.value) == (
            "coordination.verification = 'replicate' with max_byzantine = 1 needs at least 3 "
            "workers not quarantined (2 to detect a liar without outvoting it); 1 ready"
        )
        nursery.cancel_scope.cancel()


async def test_spot_check_answers_unchecked_requests_through_the_plain_pipeline() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start(nursery, net, 3)
        config = verifying("spot_check", spot_check_rate=0.5)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            assert len(b.cluster().stages) == 3
            for x in inputs(10):
                torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
            checked = sum(b.metrics().stages_verified.values())
            assert 0 < checked < 30 and checked % 3 == 0  # whole requests, every stage
        nursery.cancel_scope.cancel()


async def test_spot_check_catches_a_liar_at_the_rate_one_minus_one_minus_p_to_the_k(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker lying on every request, caught by the k-th with probability
    1 - (1 - p)^k: over 60 catches the number of requests each took is geometric."""
    p = 0.2
    monkeypatch.setattr(scheduling_service, "_SAMPLER", random.Random(7))
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start(nursery, net, 3, liars={1: Liar("sign")})
        config = verifying("spot_check", spot_check_rate=p)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            waits: list[int] = []  # requests until caught, the catching one included
            k = 0
            for x in inputs(3000):
                await b.infer(x)
                k += 1
                if quarantined(b):
                    waits.append(k)
                    k = 0
                    b.release("w1")
                    await wait_until(lambda: len(b.cluster().replicas) == 6, what="re-plan")
                    if len(waits) == 60:
                        break
        nursery.cancel_scope.cancel()
    assert len(waits) == 60
    for within in (1, 2, 4, 8):
        expected = 1 - (1 - p) ** within
        caught = sum(w <= within for w in waits)
        spread = 3 * math.sqrt(60 * expected * (1 - expected))
        assert abs(caught - 60 * expected) <= spread, (within, caught, 60 * expected)
