"""The scheduling service: admits requests, dispatches them into the pipeline, routes results back.

Up to ``scheduling.max_in_flight`` requests travel through the stages at once, so
every stage can work while the others do; results are matched to their callers by
request id whatever order they arrive in. A request's deadline covers queueing,
placement and compute; when it passes, the workers are told to drop the request.
"""

from __future__ import annotations

import itertools
import logging
import time

import attrs
import trio

from ..config import SchedulingConfig
from ..coordination import CoordinationService, Placement, Response, WorkerLost, error_from_wire
from ..errors import (
    ApiError,
    ButterflyError,
    NetworkError,
    RequestTimeout,
    SchedulingError,
    error_kind,
)
from ..metrics import MetricsSink, RequestCompleted, RequestFailed
from ..protocol import Activation, Cancel, Error, Result, WireTensor

__all__ = ["SchedulingService"]

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class _Pending:
    request_id: int
    placement: Placement
    done: trio.Event = attrs.field(factory=trio.Event)
    result: WireTensor | None = None
    error: ButterflyError | None = None

    def resolve(
        self, result: WireTensor | None = None, error: ButterflyError | None = None
    ) -> None:
        if not self.done.is_set():
            self.result, self.error = result, error
            self.done.set()


class SchedulingService:
    """FIFO admission with a bounded queue and a bounded number of requests in flight."""

    def __init__(
        self,
        config: SchedulingConfig,
        *,
        coordination: CoordinationService,
        metrics: MetricsSink,
        responses: trio.MemoryReceiveChannel[Response],
    ) -> None:
        self.config = config
        self.coordination = coordination
        self.metrics = metrics
        self._responses = responses
        self._ids = itertools.count(1)
        self._slots = trio.Semaphore(config.max_in_flight)
        self._admitted = 0
        self._pending: dict[int, _Pending] = {}
        self._idle = trio.Event()
        self._idle.set()
        self.closing = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Route worker responses to the waiting requests until cancelled."""
        task_status.started()
        async for response in self._responses:
            self._route(response)

    def _route(self, response: Response) -> None:
        match response:
            case Result(request_id=rid, epoch=epoch, tensor=tensor):
                pending = self._pending.get(rid)
                if pending is not None and pending.placement.epoch == epoch:
                    pending.resolve(result=tensor)
            case Error(request_id=rid):
                pending = self._pending.get(rid)
                if pending is not None:
                    pending.resolve(error=error_from_wire(response))
            case WorkerLost(node_id=node, address=address, reason=reason):
                for pending in list(self._pending.values()):
                    if node in pending.placement.nodes:
                        pending.resolve(
                            error=NetworkError(
                                f"worker {node} at {address} was lost during request "
                                f"{pending.request_id}: {reason}"
                            )
                        )

    async def infer(self, tensor: WireTensor, *, timeout: float) -> WireTensor:
        """Run one request through the pipeline; raises a ``ButterflyError`` on any failure."""
        if self.closing:
            raise ApiError("this Butterfly is closing; it accepts no new requests")
        if self._admitted >= self.config.max_queue_size:
            raise SchedulingError(
                f"queue full: {self._admitted} requests are waiting or running "
                f"(scheduling.max_queue_size = {self.config.max_queue_size})"
            )
        request_id = next(self._ids)
        self._admitted += 1
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        start = time.perf_counter()
        try:
            with trio.move_on_after(timeout) as deadline:
                result = await self._dispatch(request_id, tensor)
            if deadline.cancelled_caught:
                raise RequestTimeout(
                    f"request {request_id} did not complete within {timeout:g} s; "
                    "its work was cancelled on the workers"
                )
        except ButterflyError as exc:
            self.metrics.emit(RequestFailed(request_id, error_kind(exc)))
            raise
        except trio.Cancelled:  # the caller gave up (Ctrl-C, an outer timeout)
            self.metrics.emit(RequestFailed(request_id, "cancelled"))
            raise
        finally:
            self._admitted -= 1
            if self._admitted == 0:
                self._idle.set()
        batch = tensor.shape[0] if tensor.shape else 1
        self.metrics.emit(RequestCompleted(request_id, time.perf_counter() - start, batch))
        return result

    async def _dispatch(self, request_id: int, tensor: WireTensor) -> WireTensor:
        async with self._slots:
            placement = await self.coordination.ensure_placement()
            pending = _Pending(request_id, placement)
            self._pending[request_id] = pending
            try:
                first = placement.stages[0]
                await self.coordination.send(
                    first.node_id,
                    Activation(
                        request_id=request_id,
                        epoch=placement.epoch,
                        stage=0,
                        origin=self.coordination.node_id,
                        tensor=tensor,
                    ),
                )
                await pending.done.wait()
            finally:
                del self._pending[request_id]
                if not pending.done.is_set():
                    # Timed out or cancelled: free the work on every worker of the placement.
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await self._cancel_on_workers(request_id, placement)
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    async def _cancel_on_workers(self, request_id: int, placement: Placement) -> None:
        for node in placement.nodes:
            try:
                await self.coordination.send(
                    node, Cancel(request_id=request_id, origin=self.coordination.node_id)
                )
            except ButterflyError:
                pass

    async def drain(self, timeout: float) -> None:
        """Refuse new requests and wait up to ``timeout`` seconds for the admitted ones."""
        self.closing = True
        with trio.move_on_after(timeout):
            await self._idle.wait()

    def statistics(self) -> dict[str, int]:
        return {"admitted": self._admitted, "in_flight": len(self._pending)}
