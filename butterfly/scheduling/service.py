"""The scheduling service: admits tasks, batches and dispatches them into the pipeline, routes results.

    submit_task ─▶ policy queue ─▶ dispatcher ─(≤ max_in_flight batches)─▶ stage 0 … last stage
                     (fifo/priority)  (micro-batching)                            │
    task.done ◀── split rows ◀── Result / Error / WorkerLost (memory channel) ◀───┘

Up to ``scheduling.max_in_flight`` batches travel through the stages at once, so every
stage works while the others do; results are matched to their batch by request id,
whatever order they arrive in. A task's deadline covers queueing and compute: when it
passes the task fails with ``RequestTimeout``, and once no task of a batch is waiting
for it any more the workers are told to drop the batch's remaining work.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable

import attrs
import numpy as np
import trio

from ..config import SchedulingConfig
from ..coordination import (
    CoordinationService,
    Placement,
    Reported,
    Response,
    WorkerLost,
    error_from_wire,
)
from ..coordination.phases import Phase, PhaseTracker
from ..errors import (
    ApiError,
    ButterflyError,
    ByzantineError,
    ComputeError,
    CoordinationError,
    NetworkError,
    QueueFull,
    RequestTimeout,
    SchedulingError,
    error_kind,
)
from ..metrics import MetricsSink
from ..metrics.events import (
    LinkTransferred,
    SessionReplayed,
    StageComputed,
    TaskCancelled,
    TaskCompleted,
    TaskDispatched,
    TaskDispatching,
    TaskEnqueued,
    TaskFailed,
    TaskRetried,
    TaskSubmitted,
)
from ..protocol import (
    Activation,
    Cancel,
    Checkpoint,
    Error,
    Result,
    StageOutput,
    StageSpec,
    WireTensor,
    array_to_wire,
)
from .batching import batch_key, concat, split
from .policy import make_policy
from .task import InferenceTask, SessionState, TaskStatus
from .verified import run_verified

__all__ = ["SchedulingService"]

log = logging.getLogger(__name__)

#: Finished tasks remembered for ``query_status``.
_FINISHED_MEMORY = 10_000
#: Pause before re-running a request whose worker was lost, times the attempt number.
_RETRY_DELAY_S = 0.05
#: An attempt is presumed lost no sooner than this many times the slowest recent one.
_ATTEMPT_TIMEOUT_FACTOR = 3


#: Chooses the requests ``spot_check`` verifies: the workers cannot predict it.
_SAMPLER: random.Random = secrets.SystemRandom()


def _retriable(error: ButterflyError | None) -> bool:
    """A lost worker or a placement that changed under the request: running it again can
    work. Replicas that did not agree would not agree the next time either."""
    return isinstance(error, NetworkError | CoordinationError) and not isinstance(
        error, ByzantineError
    )


@attrs.define(eq=False)
class _Batch:
    """Tasks sharing one trip through the pipeline (a fresh request id for each attempt)."""

    request_id: int
    tasks: list[InferenceTask]
    placement: Placement | None = None
    phases: PhaseTracker | None = None
    #: Set on the outcome, and whenever one of its tasks is cancelled or expires.
    wake: trio.Event = attrs.field(factory=trio.Event)
    result: WireTensor | None = None
    error: ButterflyError | None = None
    #: The latest stage boundary a worker sent back for this batch (kept across attempts).
    checkpoint: Checkpoint | None = None
    #: When the current attempt last showed progress (its start, or its latest checkpoint).
    progress_at: float = 0.0
    #: Wall-clock time the current attempt was sent (links are timed on wall clocks).
    sent_wall: float = 0.0
    sent_bytes: int = 0
    #: Verified (``spot_check`` decides once per batch); the replicas' answers of the
    #: stage being verified, by node id.
    verified: bool | None = None
    reports: dict[str, StageOutput | Error] = attrs.field(factory=dict)

    @property
    def answered(self) -> bool:
        return self.result is not None or self.error is not None

    def live(self) -> list[InferenceTask]:
        return [t for t in self.tasks if not t.status.final]


class SchedulingService:
    """Admission (bounded queue, policy), dispatch (pipelining, micro-batching), deadlines, cancellation."""

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
        self._task_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._policy = make_policy(config.scheduler_type, starvation_s=config.starvation_s)
        self._tasks: dict[int, InferenceTask] = {}  # admitted: queued or running
        self._finished: collections.OrderedDict[int, TaskStatus] = collections.OrderedDict()
        self._batches: dict[int, _Batch] = {}
        self._running: dict[int, _Batch] = {}  # task id → its batch
        self._slots = trio.Semaphore(config.max_in_flight)
        self._recent_attempts_s: collections.deque[float] = collections.deque(maxlen=64)
        self._queue_changed = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._nursery: trio.Nursery | None = None
        self.closing = False

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Route worker responses and dispatch queued tasks until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._route_responses)
            nursery.start_soon(self._dispatch_loop)
            task_status.started()

    async def drain(self, timeout: float) -> None:
        """Refuse new tasks and wait up to ``timeout`` seconds for the admitted ones."""
        self.closing = True
        with trio.move_on_after(timeout):
            await self._idle.wait()

    # -- the seed's interface: submit_task, query_status, cancel_task -----------------------

    def submit_task(
        self,
        tensor: WireTensor,
        *,
        priority: int = 0,
        timeout: float | None = None,
        session: SessionState | None = None,
    ) -> InferenceTask:
        """Admit a task; raises ``SchedulingError`` at once when the queue is full.

        With ``session`` the task is the next step of that generation session: ``tensor``
        is all its tokens, and only those its stages have not cached are sent.
        """
        if self.closing:
            raise ApiError("this Butterfly is closing; it accepts no new requests")
        if len(self._tasks) >= self.config.max_queue_size:
            raise QueueFull(
                f"queue full: {len(self._tasks)} requests are waiting or running "
                f"(scheduling.max_queue_size = {self.config.max_queue_size})"
            )
        now = trio.current_time()
        task = InferenceTask(
            task_id=next(self._task_ids),
            input=tensor,
            priority=priority,
            deadline=now + timeout if timeout is not None else None,
            submitted_at=now,
            status=TaskStatus.QUEUED,
            session=session,
        )
        task.on_done.append(self._on_task_done)
        self._tasks[task.task_id] = task
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self.metrics.emit(TaskSubmitted(task.task_id, now, task.rows, priority))
        self._policy.push(task)
        self.metrics.emit(TaskEnqueued(task.task_id, now, len(self._policy)))
        self._signal_queue()
        return task

    def query_status(self, task_id: int) -> TaskStatus:
        task = self._tasks.get(task_id)
        if task is not None:
            return task.status
        try:
            return self._finished[task_id]
        except KeyError:
            raise SchedulingError(f"unknown task id {task_id}") from None

    def cancel_task(self, task_id: int) -> bool:
        """Cancel a queued or running task; ``False`` if it had already finished."""
        task = self._tasks.get(task_id)
        if task is None:
            if task_id in self._finished:
                return False
            raise SchedulingError(f"unknown task id {task_id}")
        batch = self._running.get(task_id)  # look it up first: finishing forgets it
        cancelled = task.finish(
            TaskStatus.CANCELLED, error=ApiError(f"task {task_id} was cancelled")
        )
        if batch is not None:
            batch.wake.set()  # the batch may have no one left waiting for it
        return cancelled

    async def wait(self, task: InferenceTask) -> WireTensor:
        """The task's output, or its error. Cancelling the wait cancels the task."""
        try:
            await task.done.wait()
        except trio.Cancelled:
            self.cancel_task(task.task_id)
            raise
        if task.result is None:
            assert task.error is not None
            raise task.error
        return task.result

    def _on_task_done(self, task: InferenceTask) -> None:
        self._tasks.pop(task.task_id, None)
        batch = self._running.pop(task.task_id, None)
        self._finished[task.task_id] = task.status
        while len(self._finished) > _FINISHED_MEMORY:
            self._finished.popitem(last=False)
        now = trio.current_time()
        if task.status is TaskStatus.COMPLETED:
            nodes = tuple(sorted(batch.placement.nodes)) if batch and batch.placement else ()
            self.metrics.emit(
                TaskCompleted(task.task_id, now, now - task.submitted_at, task.rows, nodes)
            )
        elif task.status is TaskStatus.CANCELLED:
            self.metrics.emit(TaskCancelled(task.task_id, now))
        else:
            error = task.error or ButterflyError()
            self.metrics.emit(TaskFailed(task.task_id, now, error_kind(error), str(error)))
        if not self._tasks:
            self._idle.set()

    # -- dispatch ----------------------------------------------------------------------

    def _signal_queue(self) -> None:
        self._queue_changed.set()
        self._queue_changed = trio.Event()

    def _expire(self, task: InferenceTask) -> None:
        assert task.deadline is not None
        timeout = task.deadline - task.submitted_at
        task.finish(
            TaskStatus.FAILED,
            error=RequestTimeout(
                f"request {task.task_id} did not complete within {timeout:g} s; its work was cancelled"
            ),
        )

    def _next_task(
        self, predicate: Callable[[InferenceTask], bool] | None = None
    ) -> InferenceTask | None:
        """Pop the next runnable task, failing the ones whose deadline passed in the queue."""
        now = trio.current_time()
        while True:
            task = self._policy.pop(now) if predicate is None else self._policy.take(predicate, now)
            if task is None or task.deadline is None or task.deadline > now:
                return task
            self._expire(task)

    async def _dispatch_loop(self) -> None:
        assert self._nursery is not None
        while True:
            await self._slots.acquire()
            task = self._next_task()
            while task is None:
                await self._queue_changed.wait()
                task = self._next_task()
            tasks = await self._gather_batch(task)
            batch = _Batch(request_id=0, tasks=tasks)
            now = trio.current_time()
            for t in tasks:
                t.status = TaskStatus.RUNNING
                self._running[t.task_id] = batch
                self.metrics.emit(TaskDispatching(t.task_id, now, len(tasks)))
            self._nursery.start_soon(self._run_batch, batch)

    async def _gather_batch(self, first: InferenceTask) -> list[InferenceTask]:
        """Add compatible queued tasks (arriving within ``max_batch_wait_ms``) up to the row limit."""
        limit = self.config.dispatch_batch_size
        tasks, rows = [first], first.rows
        if rows >= limit or first.session is not None:
            return tasks  # a session's step carries its own caches: never merged
        key = batch_key(first.input)

        def fits(t: InferenceTask) -> bool:
            return t.session is None and batch_key(t.input) == key and rows + t.rows <= limit

        deadline = trio.current_time() + self.config.max_batch_wait_ms / 1000
        while rows < limit:
            more = self._next_task(fits)
            if more is not None:
                tasks.append(more)
                rows += more.rows
                continue
            if trio.current_time() >= deadline:
                break
            with trio.move_on_at(deadline):
                await self._queue_changed.wait()
        return tasks

    async def _run_batch(self, batch: _Batch) -> None:
        try:
            await self._execute(batch)
            if (
                batch.error is not None
                and isinstance(batch.error, ComputeError)
                and len(batch.live()) > 1
            ):
                # One request's bad input must not fail the requests it was batched with.
                await self._retry_one_by_one(batch)
                return
            self._settle(batch)
        finally:
            self._slots.release()

    async def _retry_one_by_one(self, batch: _Batch) -> None:
        for task in batch.live():
            single = _Batch(request_id=0, tasks=[task])
            self._running[task.task_id] = single
            await self._execute(single)
            self._settle(single)

    async def _execute(self, batch: _Batch) -> None:
        """Run the batch through the pipeline; if a worker is lost on the way, run it again on
        the new placement (each attempt under a fresh request id, so a late answer from an
        earlier attempt is ignored and every task is answered exactly once)."""
        if batch.phases is None:
            # Keyed by the first task: request ids change from one attempt to the next.
            batch.phases = PhaseTracker(
                "request", batch.tasks[0].task_id, self.coordination.report_phase
            )
        for attempt in range(self.config.max_retries + 1):
            batch.request_id = next(self._request_ids)
            reason = error_kind(batch.error) if batch.error is not None else ""
            batch.result, batch.error = None, None
            await self._attempt(batch, attempt, reason)
            if not (_retriable(batch.error) and batch.live() and attempt < self.config.max_retries):
                return
            log.info(
                "retrying request of tasks %s after: %s",
                [t.task_id for t in batch.live()],
                batch.error,
            )
            # Let coordination notice the loss before planning again. The microseconds by
            # task id make the requests a loss woke together go again oldest first (they
            # then queue fairly for the placement); trio would otherwise wake them in any order.
            await trio.sleep(
                _RETRY_DELAY_S * (attempt + 1) + 1e-6 * (batch.tasks[0].task_id % 10_000)
            )

    async def _attempt(self, batch: _Batch, attempt: int, reason: str) -> None:
        """One trip: wait for its outcome, its tasks' deadlines or their cancellation;
        ``reason`` is the kind of error that ended the previous attempt."""
        assert batch.phases is not None
        try:
            batch.placement = await self.coordination.ensure_placement()
            batch.phases.advance(Phase.ASSIGNMENT)
            stage, layer, tensor, position, keep = self._entry(batch)
            session = batch.tasks[0].session
            started = trio.current_time()
            for task in batch.live() if attempt else ():
                self.metrics.emit(TaskRetried(task.task_id, started, attempt, reason, layer))
            self._batches[batch.request_id] = batch
            epoch = batch.placement.epoch
            self.coordination.request_started(epoch)
            try:
                if self._verifies(batch):
                    batch.phases.advance(Phase.COMPUTATION)
                    batch.result = await run_verified(
                        batch,
                        tensor,
                        session=session.session_id if session else 0,
                        position=position,
                        keep=keep,
                        whole_session=session is not None,
                        coordination=self.coordination,
                        metrics=self.metrics,
                        wait=functools.partial(self._wait_for, batch),
                        timeout=self._attempt_timeout(),
                    )
                    self._after_attempt(batch, session, epoch, started)
                    return
                await self.coordination.send(
                    stage.node_id,
                    Activation(
                        request_id=batch.request_id,
                        epoch=epoch,
                        stage=stage.index,
                        origin=self.coordination.node_id,
                        layer=layer,
                        compute_s=0.0,
                        session=session.session_id if session else 0,
                        position=position,
                        keep=keep,
                        trace=(),
                        report=False,
                        tensor=tensor,
                    ),
                )
                batch.phases.advance(Phase.COMPUTATION)
                batch.sent_wall, batch.sent_bytes = time.time(), tensor.data.nbytes
                for task in batch.live():
                    self.metrics.emit(
                        TaskDispatched(
                            task.task_id, started, batch.request_id, epoch, attempt, layer
                        )
                    )
                await self._await_outcome(batch, started)
                self._after_attempt(batch, session, epoch, started)
            finally:
                del self._batches[batch.request_id]
                self.coordination.request_finished(epoch)
                if not batch.answered:
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await self._cancel_on_workers(batch)
        except ButterflyError as exc:
            batch.error = batch.error or exc
        except Exception as exc:
            # A bug on one request's path must fail that request, not the whole client.
            log.exception("request %d failed unexpectedly", batch.request_id)
            batch.error = batch.error or SchedulingError(
                f"request {batch.request_id} failed on an internal error: "
                f"{type(exc).__name__}: {exc}"
            )

    def _after_attempt(
        self, batch: _Batch, session: SessionState | None, epoch: int, started: float
    ) -> None:
        if batch.result is not None:
            self._recent_attempts_s.append(trio.current_time() - started)
        if session is not None:
            # Cached on this placement now; after a failure, replay next time.
            ok = batch.result is not None
            session.epoch = epoch if ok else 0
            session.cached = session.tokens.shape[1] if ok else 0
            session.keep = ()

    def _verifies(self, batch: _Batch) -> bool:
        """Whether the batch runs verified: always under ``replicate``; under
        ``spot_check`` a fraction of requests, drawn once per request (or per generation
        session, at its first step: its replicas must build their caches from the start)."""
        if batch.verified is None:
            cfg = self.coordination.config.coordination
            session = batch.tasks[0].session
            if cfg.verification != "spot_check":
                batch.verified = cfg.verification == "replicate"
            elif session is not None:
                if session.verified is None:
                    session.verified = _SAMPLER.random() < cfg.spot_check_rate
                batch.verified = session.verified
            else:
                batch.verified = _SAMPLER.random() < cfg.spot_check_rate
        return batch.verified

    async def _wait_for(self, batch: _Batch, done: Callable[[], bool], until: float) -> bool:
        """Wait until ``done()`` or ``until``, expiring tasks whose deadline passes; False
        when the attempt ended meanwhile (an error, or no task waits for it any more)."""
        while not done():
            live = batch.live()
            if batch.error is not None or not live:
                return False
            now = trio.current_time()
            if now >= until:
                return True
            deadlines = [t.deadline for t in live if t.deadline is not None]
            with trio.move_on_at(min([*deadlines, until])):
                await batch.wake.wait()
            batch.wake = trio.Event()
            now = trio.current_time()
            for task in live:
                if task.deadline is not None and task.deadline <= now:
                    self._expire(task)
        return batch.error is None and bool(batch.live())

    def _entry(self, batch: _Batch) -> tuple[StageSpec, int, WireTensor, int, tuple[int, ...]]:
        """Where an attempt starts (stage, layer, tensor, session position, rows kept): at
        the batch's checkpoint if it has one, else at its input; a session's step sends the
        tokens its stages have not cached, or all of them (a replay) when their caches are
        gone."""
        assert batch.placement is not None
        stages = batch.placement.stages
        checkpoint = batch.checkpoint
        if checkpoint is not None:
            for stage in stages:
                if stage.start <= checkpoint.layer < stage.stop:
                    return stage, checkpoint.layer, checkpoint.tensor, 0, ()
        session = batch.tasks[0].session
        if session is not None:
            position = session.cached if session.epoch == batch.placement.epoch else 0
            if position == 0 and session.started:
                self.metrics.emit(SessionReplayed(session.session_id, session.tokens.shape[1]))
            session.started = True
            tokens = np.ascontiguousarray(session.tokens[:, position:])
            keep = session.keep if position else ()
            return stages[0], stages[0].start, array_to_wire(tokens), position, keep
        return stages[0], stages[0].start, concat([t.input for t in batch.tasks]), 0, ()

    def _attempt_timeout(self) -> float:
        slowest = max(self._recent_attempts_s, default=0.0)
        return max(self.config.attempt_timeout, _ATTEMPT_TIMEOUT_FACTOR * slowest)

    async def _await_outcome(self, batch: _Batch, started: float) -> None:
        """Until the attempt is answered, its tasks are gone, or nothing was heard of it for
        the attempt timeout: a checkpoint proves a long request is still running."""
        timeout = self._attempt_timeout()
        batch.progress_at = started
        while not batch.answered:
            give_up_at = batch.progress_at + timeout
            live = batch.live()
            if not live:
                return  # every task was cancelled or expired: nobody waits for this batch
            deadlines = [t.deadline for t in live if t.deadline is not None]
            with trio.move_on_at(min([*deadlines, give_up_at])):
                await batch.wake.wait()
            batch.wake = trio.Event()
            now = trio.current_time()
            for task in live:
                if task.deadline is not None and task.deadline <= now:
                    self._expire(task)
            if not batch.answered and now >= batch.progress_at + timeout:
                # No answer, no error, no worker lost: a message went missing on the way.
                batch.error = NetworkError(
                    f"request {batch.request_id} got no answer within {timeout:g} s "
                    "(scheduling.attempt_timeout); presumed lost on the way"
                )

    def _settle(self, batch: _Batch) -> None:
        live = batch.live()
        if batch.error is not None:
            for task in live:
                task.finish(TaskStatus.FAILED, error=batch.error)
            return
        if batch.result is None:
            return
        if batch.phases is not None:
            batch.phases.advance(Phase.AGGREGATION)
        try:
            outputs = split(batch.result, [t.rows for t in batch.tasks])
        except ButterflyError as exc:
            for task in live:
                task.finish(TaskStatus.FAILED, error=exc)
            return
        for task, output in zip(batch.tasks, outputs, strict=True):
            task.finish(TaskStatus.COMPLETED, result=output)
        if batch.phases is not None:
            batch.phases.advance(Phase.COMMITMENT)

    async def _cancel_on_workers(self, batch: _Batch) -> None:
        if batch.placement is None:
            return
        for node in sorted(batch.placement.nodes):
            try:
                await self.coordination.send(
                    node, Cancel(request_id=batch.request_id, origin=self.coordination.node_id)
                )
            except ButterflyError:
                pass

    # -- responses from the workers ------------------------------------------------------------

    def _attempt_on(self, request_id: int, epoch: int) -> _Batch | None:
        """The batch whose current attempt is ``request_id`` on placement ``epoch``: answers
        of earlier attempts or of an old epoch find none and are dropped."""
        batch = self._batches.get(request_id)
        if batch is None or batch.placement is None or batch.placement.epoch != epoch:
            return None
        return batch

    async def _route_responses(self) -> None:
        async for response in self._responses:
            match response:
                case Result(request_id=rid, epoch=epoch, tensor=tensor):
                    if batch := self._attempt_on(rid, epoch):
                        batch.result = tensor
                        batch.wake.set()
                        self._account(batch, response)
                case Checkpoint(request_id=rid, epoch=epoch):
                    if batch := self._attempt_on(rid, epoch):
                        batch.checkpoint = response
                        batch.progress_at = trio.current_time()  # not lost: still running
                case Reported(node_id=node, message=StageOutput(request_id=rid) as output):
                    if (batch := self._attempt_on(rid, output.epoch)) and batch.verified:
                        batch.reports[node] = output
                        batch.wake.set()
                case Reported(node_id=node, message=Error(request_id=rid) as error):
                    batch = self._batches.get(rid)
                    if batch is not None and batch.verified:
                        batch.reports[node] = error  # one replica's failure, outvoted or not
                        batch.wake.set()
                    elif batch is not None:
                        batch.error = error_from_wire(error)
                        batch.wake.set()
                case WorkerLost(node_id=node, address=address, reason=reason):
                    for batch in list(self._batches.values()):
                        if batch.placement is not None and node in batch.placement.nodes:
                            batch.error = NetworkError(
                                f"worker {node} at {address} was lost during request {batch.request_id}: {reason}"
                            )
                            batch.wake.set()

    def _account(self, batch: _Batch, result: Result) -> None:
        """Where the time of the request went, from the timings its stages appended: one
        event per stage and per hop between nodes, for all the request's tasks together."""
        live = batch.live()
        if not live or not result.trace:
            return
        now, arrived = trio.current_time(), time.time()
        me, tasks = self.coordination.node_id, tuple(t.task_id for t in live)
        src, sent, nbytes = me, batch.sent_wall, batch.sent_bytes
        for stage in result.trace:
            if stage.node_id != src:  # consecutive stages on one worker cross no link
                self.metrics.emit(
                    LinkTransferred(
                        tasks[0], now, tasks, src, stage.node_id, stage.received - sent, nbytes
                    )
                )
            self.metrics.emit(
                StageComputed(
                    tasks[0], now, tasks, result.request_id, stage.stage, stage.node_id,
                    stage.wait_s, stage.compute_s, stage.out_bytes,
                )
            )  # fmt: skip
            src, sent, nbytes = stage.node_id, stage.done, stage.out_bytes
        self.metrics.emit(LinkTransferred(tasks[0], now, tasks, src, me, arrived - sent, nbytes))

    def statistics(self) -> dict[str, int]:
        return {
            "admitted": len(self._tasks),
            "queued": len(self._policy),
            "running_batches": len(self._batches),
        }
