"""Run a small in-memory cluster under seeded faults and account for every request.

Used by the 1,000-seed test (tests/test_faults.py) and the fault report in bench/faults.py.
"""

from __future__ import annotations

import collections
from collections import Counter
from collections.abc import Iterable

import attrs
import torch
import trio
import trio.testing

from butterfly import AsyncButterfly
from butterfly.config import load_config
from butterfly.model import ModelSource
from butterfly.transport.faults import FaultyNetwork
from butterfly.worker import WorkerService
from tests.inmemory import local_forward

#: Fast heartbeats; a patient caller (faults may cost several attempts); an attempt with no
#: answer is re-run after 5 s of (mock) time; a lost Assign is given up after 5 s.
CHAOS = {
    "api": {"request_timeout": 3600.0, "connect_timeout": 5.0},
    "coordination": {"heartbeat_interval": 0.2, "acceptable_heartbeat_pause": 1.0},
    "partition": {"default_strategy": "uniform"},
    "scheduling": {"max_retries": 50, "attempt_timeout": 5.0},
    "network": {"connect_timeout": 1.0, "reconnect_max_delay": 0.5},
}


@attrs.frozen
class Outcome:
    """What happened to the requests of one seeded run."""

    seed: int
    submitted: int
    completed: int
    #: Requests that raised instead of answering.
    failed: int
    #: Answers beyond one per request.
    duplicated: int
    #: Answers that differ from a local forward of the same input.
    wrong: int
    faults: tuple[tuple[str, int, str], ...]
    retries: int

    @property
    def lost(self) -> int:
        return self.submitted - self.completed

    def fault_counts(self) -> dict[str, int]:
        return dict(collections.Counter(kind for _, _, kind in self.faults))


async def _run(
    seed: int, requests: int, drop: float, duplicate: float, reorder: float, source: ModelSource
) -> Outcome:
    net = FaultyNetwork(seed=seed, drop=drop, duplicate=duplicate, reorder=reorder)
    net.enabled = False  # faults start once the cluster is up: connect itself is not under test
    config = load_config(CHAOS)
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(2, 64, generator=generator) for _ in range(requests)]
    answers: collections.Counter[int] = collections.Counter()
    wrong = failed = 0
    async with trio.open_nursery() as nursery:
        for i in range(3):
            address = f"mem://w{i}"
            worker = WorkerService(
                source,
                transport=net.node(address),
                listen=address,
                peers=("mem://w0",) if i else (),
                config=config,
                node_id=f"w{i}",
                in_threads=False,
            )
            await nursery.start(worker.run)
        await trio.sleep(0.05)
        async with AsyncButterfly.connect(
            ["mem://w0"], transport=net.node("coordinator"), config=config
        ) as b:
            net.enabled = True

            async def one(i: int) -> None:
                nonlocal wrong, failed
                try:
                    y = await b.infer(inputs[i])
                except Exception:
                    failed += 1
                    return
                answers[i] += 1
                wrong += not torch.equal(y, local_forward(inputs[i]))

            async with trio.open_nursery() as requests_nursery:
                for i in range(requests):
                    requests_nursery.start_soon(one, i)
            retries = sum(b.metrics().requests_retried.values())  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
    return Outcome(
        seed=seed,
        submitted=requests,
        completed=len(answers),
        failed=failed,
        duplicated=sum(n - 1 for n in answers.values()),
        wrong=wrong,
        faults=tuple((f.link, f.index, f.kind) for f in net.faults),
        retries=retries,
    )


def run_seeds(
    seeds: Iterable[int], source: ModelSource
) -> tuple[Counter[str], Counter[str], list[int]]:
    """Totals of :class:`Outcome` counts over ``seeds``, faults by kind, and the seeds that
    lost, duplicated or got a wrong answer (replay one with :func:`run_seed`)."""
    totals: Counter[str] = collections.Counter()
    faults: Counter[str] = collections.Counter()
    bad = []
    for seed in seeds:
        outcome = run_seed(seed, source=source)
        totals.update(
            submitted=outcome.submitted,
            completed=outcome.completed,
            lost=outcome.lost,
            failed=outcome.failed,
            duplicated=outcome.duplicated,
            wrong=outcome.wrong,
            retries=outcome.retries,
        )
        faults.update(outcome.fault_counts())
        if outcome.lost or outcome.duplicated or outcome.wrong:
            bad.append(seed)
    return totals, faults, bad


def run_seed(
    seed: int,
    *,
    requests: int = 4,
    drop: float = 0.05,
    duplicate: float = 0.05,
    reorder: float = 0.05,
    source: ModelSource | None = None,
) -> Outcome:
    """One seeded run in a fresh trio loop on a mock clock (timeouts cost no real time).

    Workers compute on the event loop and trio's scheduler is seeded, so nothing depends on
    real time or chance but the seed: a failing seed replays exactly.
    """
    source = source or ModelSource("butterfly.model.zoo:mlp", profile=False)
    clock = trio.testing.MockClock(autojump_threshold=0)
    # trio picks the order of tasks that become runnable together at random, from a
    # generator it seeds for tests only (hypothesis does the same): seed it here.
    trio._core._run._r.seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: thread hand-offs would cost more than the math
    try:
        return trio.run(_run, seed, requests, drop, duplicate, reorder, source, clock=clock)
    finally:
        torch.set_num_threads(threads)
