"""The coordinator side as one set of services in one nursery.

    metrics ◀── events ── partition, coordination, scheduling
    api (facade) ─▶ scheduling ─▶ coordination ─▶ transport ─▶ workers
                         ◀── Result / Error / WorkerLost (memory channel) ──┘

``run`` reports readiness once the cluster is discovered and the first placement is
assigned; ``aclose`` drains in-flight requests with a deadline, then cancels.
"""

from __future__ import annotations

from typing import Any

import trio

from ._inputs import check_input, from_wire, to_wire
from .config import ButterflyConfig
from .coordination import CoordinationService, Response
from .errors import ApiError
from .metrics import MetricsService
from .partition import PartitionService
from .scheduling import SchedulingService
from .transport import Transport, WebsocketTransport
from .types import ClusterInfo

__all__ = ["ButterflySystem"]


class ButterflySystem:
    """Wires metrics, partition, coordination and scheduling for one coordinator."""

    def __init__(
        self,
        peers: tuple[str, ...],
        *,
        config: ButterflyConfig,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.transport = transport or WebsocketTransport(config.network)
        self.metrics = MetricsService(config.metrics)
        self.partition = PartitionService(config.partition, self.metrics)
        send, receive = trio.open_memory_channel[Response](config.scheduling.max_queue_size)
        self.coordination = CoordinationService(
            peers,
            transport=self.transport,
            config=config,
            metrics=self.metrics,
            partition=self.partition,
            responses=send,
        )
        self.scheduling = SchedulingService(
            config.scheduling,
            coordination=self.coordination,
            metrics=self.metrics,
            responses=receive,
        )
        self._stop = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every service; ready once the model is placed; runs until :meth:`aclose`."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.metrics.run)
            await nursery.start(self.scheduling.run)
            await nursery.start(self.coordination.run)
            task_status.started()
            await self._stop.wait()
            await self.scheduling.drain(self.config.api.drain_timeout)
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return."""
        self._stop.set()

    async def infer(self, x: Any, *, timeout: float | None = None) -> Any:
        """Run ``x`` through the pipeline; returns the output in ``x``'s kind and device."""
        if timeout is not None and not timeout > 0:
            raise ApiError(f"timeout must be a positive number of seconds, got {timeout!r}")
        tensor, kind = to_wire(x)
        check_input(
            tensor, self.coordination.input_spec, max_bytes=self.config.network.max_message_size
        )
        result = await self.scheduling.infer(
            tensor, timeout=timeout or self.config.api.request_timeout
        )
        return from_wire(result, kind)

    def cluster(self) -> ClusterInfo:
        return self.coordination.cluster()
