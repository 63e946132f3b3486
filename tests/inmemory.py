"""Helpers for tests that run workers and a coordinator in one process over the in-memory transport."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import trio

from butterfly.config import ButterflyConfig, load_config
from butterfly.model import ModelSource
from butterfly.model.zoo import mlp
from butterfly.transport import MemoryNetwork
from butterfly.worker import WorkerService
from tests.waiting import wait_until

# Uniform placement: these tests check where layers go, not how well the planner chooses.
FAST = {
    "coordination": {"heartbeat_interval": 0.2, "acceptable_heartbeat_pause": 1.0},
    "partition": {"default_strategy": "uniform"},
}


async def start_workers(
    nursery: trio.Nursery,
    net: MemoryNetwork,
    model: str,
    n: int = 3,
    config: ButterflyConfig | None = None,
) -> list[WorkerService]:
    """Worker 0 alone, the others with ``--peers`` worker 0 (as LocalCluster does)."""
    workers: list[WorkerService] = []
    for i in range(n):
        peers = ("mem://w0",) if i else ()
        worker = WorkerService(
            ModelSource(model, profile=False),
            transport=net,
            listen=f"mem://w{i}",
            peers=peers,
            config=config or load_config(FAST),
        )
        await nursery.start(worker.run)
        workers.append(worker)
    await acquainted(workers)
    return workers


async def acquainted(workers: Sequence[WorkerService]) -> None:
    """Wait until worker 0, which a coordinator dials, knows every other worker: the
    announcements have landed, so the coordinator discovers the whole cluster."""
    others = {w.address for w in workers[1:]}
    await wait_until(lambda: others <= set(workers[0].peers), what="worker 0 knows its peers")


def local_forward(x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return mlp()(x)
