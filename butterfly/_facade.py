"""The public entry points: :class:`Butterfly` (blocking) and :class:`AsyncButterfly` (trio)."""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import aclosing, asynccontextmanager, closing
from typing import Any, TypeVar

import numpy as np
import trio

from ._errors import collapse
from ._inputs import InputKind, check_timeout, from_wire, tokens_as
from ._local import LocalCluster
from ._portal import Portal, refuse_inside_trio
from .config import ButterflyConfig, load_config
from .credentials import generate_secret, load_secret
from .errors import ApiError, ButterflyError, RequestTimeout
from .generation import check_token_ids
from .metrics import Event, MetricsSnapshot
from .scheduling import InferenceTask, TaskStatus
from .system import ButterflySystem
from .transport import Transport, WebsocketTransport
from .types import ClusterInfo

__all__ = ["AsyncButterfly", "AsyncTaskHandle", "Butterfly", "TaskHandle"]

T = TypeVar("T")

ConfigSource = ButterflyConfig | str | os.PathLike[str] | dict[str, Any] | None


def _check_peers(peers: Iterable[str] | str, transport: Transport) -> tuple[str, ...]:
    if isinstance(peers, str):
        peers = [peers]
    try:
        result = tuple(peers)
    except TypeError:
        raise ApiError(
            f"peers must be a list of 'ws://HOST:PORT' addresses, got {peers!r}"
        ) from None
    if not result:
        raise ApiError(
            "peers is empty: give at least one worker address, e.g. ['ws://10.0.0.5:7070']"
        )
    for peer in result:
        if not isinstance(peer, str):
            raise ApiError(f"peer {peer!r} is not a string; expected 'ws://HOST:PORT'")
        try:
            transport.validate_address(peer)
        except ButterflyError as exc:
            raise ApiError(str(exc)) from None
    return result


class Butterfly:
    """A blocking client of a Butterfly cluster; safe to share between threads.

    >>> with Butterfly.connect(["ws://10.0.0.5:7070"]) as b:
    ...     y = b.infer(x)
    """

    def __init__(
        self, portal: Portal, system: ButterflySystem, *, on_close: Callable[[], None] | None = None
    ) -> None:
        self._portal = portal
        self._system = system
        self._on_close = on_close
        self._closed = False

    @classmethod
    def connect(
        cls,
        peers: Iterable[str] | str,
        *,
        config: ConfigSource = None,
        timeout: float | None = None,
        transport: Transport | None = None,
        secret: str | bytes | None = None,
    ) -> Butterfly:
        """Discover the cluster from ``peers``, place the model, and return a ready client.

        ``secret`` is the cluster's shared secret (default: the file ``network.secret_file``
        names, else the ``BUTTERFLY_SECRET`` environment variable, else none).

        Raises ``NetworkError`` naming the addresses tried when no worker answers,
        ``AuthenticationError`` when none accepts this client's secret (or lack of one), and
        ``FingerprintMismatch`` when the workers hold different weights.
        """
        refuse_inside_trio("Butterfly.connect")
        cfg = load_config(config)
        key = load_secret(secret, secret_file=cfg.network.secret_file)
        transport = transport or WebsocketTransport(cfg.network)
        seeds = _check_peers(peers, transport)
        check_timeout(timeout, "timeout")
        system = ButterflySystem(seeds, config=cfg, transport=transport, secret=key)
        portal = Portal()
        portal.start(system.run, timeout=timeout or cfg.api.connect_timeout)
        return cls(portal, system)

    @classmethod
    def local(
        cls,
        model: str | Callable[..., Any],
        workers: int = 3,
        *,
        config: ConfigSource = None,
        timeout: float | None = None,
        **worker_options: Any,
    ) -> Butterfly:
        """Start ``workers`` local worker processes serving ``model`` and connect to them.

        ``worker_options`` are those of :class:`~butterfly._local.LocalCluster`
        (``weights``, ``threads``, ``device``). The processes stop when the client closes.
        They and this client share a random secret made for them (unless ``secret`` is
        among ``worker_options``): nothing else on the machine can use the workers.
        """
        refuse_inside_trio("Butterfly.local")
        secret = worker_options.pop("secret", None) or generate_secret()
        cluster = LocalCluster(model, workers, secret=secret, **worker_options)
        try:
            client = cls.connect(cluster.addresses, config=config, timeout=timeout, secret=secret)
        except BaseException:
            cluster.close()
            raise
        client._on_close = cluster.close
        client.local_cluster = cluster
        return client

    local_cluster: LocalCluster | None = None

    def infer(self, x: Any, *, timeout: float | None = None) -> Any:
        """Run ``x`` (numpy array or torch tensor, batch first) through the model's stages.

        Returns the output as the same kind, dtype and device that a local forward gives.
        """
        refuse_inside_trio("Butterfly.infer")
        check_timeout(timeout, "timeout")
        return self._portal.call(functools.partial(self._system.infer, timeout=timeout), x)

    def submit(self, x: Any, *, priority: int = 0, timeout: float | None = None) -> TaskHandle:
        """Queue ``x`` and return at once; ``handle.result()`` waits for the output.

        ``priority`` matters with ``scheduling.scheduler_type = "priority"`` (higher first).
        ``timeout`` (seconds, default ``api.request_timeout``) covers queueing and compute.
        Raises ``SchedulingError`` at once when ``scheduling.max_queue_size`` tasks are pending.
        """
        refuse_inside_trio("Butterfly.submit")
        future: concurrent.futures.Future[InferenceTask] = concurrent.futures.Future()

        async def submit() -> tuple[InferenceTask, InputKind]:
            task, kind = self._system.submit(x, priority=priority, timeout=timeout)
            # Runs in the trio thread when the task finishes; Future is thread-safe.
            task.on_done.append(future.set_result)
            return task, kind

        task, kind = self._portal.call(submit)
        return TaskHandle(self, task.task_id, kind, future)

    def infer_many(self, xs: Sequence[Any], *, timeout: float | None = None) -> list[Any]:
        """Run a list of independent inputs through the pipeline concurrently; outputs in order.

        If one fails, the others are cancelled and its error is raised.
        """
        refuse_inside_trio("Butterfly.infer_many")
        check_timeout(timeout, "timeout")
        return self._portal.call(functools.partial(self._system.infer_many, timeout=timeout), xs)

    def generate(
        self,
        input_ids: Any,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Iterable[int] = (),
        timeout: float | None = None,
    ) -> Any:
        """Generate up to ``max_new_tokens`` tokens after ``input_ids`` (``(batch, seq)`` token
        ids; negative ids pad rows shorter than others) with a decoder model; returns
        ``(batch, seq + n)`` token ids in the prompt's kind, the prompt as given. Greedy unless ``do_sample``; ``seed`` makes sampling
        reproducible; rows end at a ``stop`` token (and then repeat it). ``timeout`` bounds
        each step. Each stage keeps the session's KV cache, so a step sends one token.
        """
        sampling = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
            "stop": stop,
        }
        steps, kind = self._steps(input_ids, timeout, sampling)
        parts = [check_token_ids(input_ids), *(step[:, None] for step in steps)]
        return tokens_as(np.concatenate(parts, axis=1), kind)

    def stream(
        self, input_ids: Any, *, timeout: float | None = None, **sampling: Any
    ) -> Iterator[Any]:
        """Like :meth:`generate`, but yield each step's ``(batch,)`` tokens as they come.

        Closing the iterator early ends the session (its caches are freed on the workers).
        """
        steps, kind = self._steps(input_ids, timeout, sampling)
        with closing(steps):
            for step in steps:
                yield tokens_as(step, kind)

    def _steps(
        self, input_ids: Any, timeout: float | None, sampling: dict[str, Any]
    ) -> tuple[Generator[np.ndarray, None, None], InputKind]:
        """Start a generation in the trio thread; its steps, pulled one call at a time."""
        refuse_inside_trio("Butterfly.generate")

        start = functools.partial(self._system.stream, input_ids, timeout=timeout, **sampling)
        tokens, kind = self._portal.call(_sync_to_async(start))

        def steps() -> Generator[np.ndarray, None, None]:
            try:
                while True:
                    try:
                        yield self._portal.call(tokens.__anext__)
                    except StopAsyncIteration:
                        return
            finally:
                self._portal.call(tokens.aclose)

        return steps(), kind

    def cluster(self) -> ClusterInfo:
        """The workers (id, address, state) and the current placement."""
        return self._portal.call(_sync_to_async(self._system.cluster))

    def metrics(self) -> MetricsSnapshot:
        """A snapshot of the coordinator's metrics (request counts, latency percentiles,
        where the time went per stage and link)."""
        return self._portal.call(_sync_to_async(self._system.metrics.snapshot))

    def metrics_text(self) -> str:
        """Every metric in the Prometheus text format (what a ``/metrics`` endpoint serves)."""
        return self._portal.call(_sync_to_async(self._system.metrics.exposition))

    def trace(self, task_id: int) -> list[Event]:
        """Task ``task_id``'s events in order: submitted, queued, dispatched, each stage's
        compute and each hop, completed (the most recent ``metrics.trace_tasks`` tasks)."""
        _check_task_id(task_id)
        return self._portal.call(_sync_to_async(lambda: self._system.metrics.trace(task_id)))

    def close(self) -> None:
        """Drain in-flight requests (``api.drain_timeout``), stop, and join the background thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._portal.run_sync_soon(self._system.stop)
            self._portal.join(self._system.config.api.drain_timeout + 10)
        finally:
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> Butterfly:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TaskHandle:
    """A submitted request. Thread-safe; ``result`` may be called from any thread."""

    def __init__(
        self,
        client: Butterfly,
        task_id: int,
        kind: InputKind,
        future: concurrent.futures.Future[InferenceTask],
    ) -> None:
        self.task_id = task_id
        self._client = client
        self._kind = kind
        self._future = future

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the output (in the input's kind and device) or raise the task's error.

        ``timeout`` bounds this wait only: on expiry ``RequestTimeout`` is raised and the
        task keeps running (``cancel()`` it if its answer is no longer wanted).
        """
        check_timeout(timeout, "timeout")
        try:
            task = self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RequestTimeout(
                f"task {self.task_id} has not finished within {timeout:g} s; it is still "
                f"{self.status()} (cancel() it if its answer is no longer wanted)"
            ) from None
        if task.result is None:
            assert task.error is not None
            raise task.error
        return from_wire(task.result, self._kind)

    def done(self) -> bool:
        return self._future.done()

    def status(self) -> TaskStatus:
        """Pending, Queued, Running, Completed, Failed or Cancelled."""
        scheduling = self._client._system.scheduling
        return self._client._portal.call(
            _sync_to_async(lambda: scheduling.query_status(self.task_id))
        )

    def cancel(self) -> bool:
        """Cancel the task if it is queued or running (its work is dropped on every worker).

        Returns ``False`` if it had already finished.
        """
        scheduling = self._client._system.scheduling
        return self._client._portal.call(
            _sync_to_async(lambda: scheduling.cancel_task(self.task_id))
        )

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} {'done' if self.done() else 'pending'}>"


def _sync_to_async(fn: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    async def call() -> T:
        return fn()

    return call


class AsyncButterfly:
    """The same client for trio programs.

    >>> async with AsyncButterfly.connect(["ws://10.0.0.5:7070"]) as b:
    ...     y = await b.infer(x)
    """

    def __init__(self, system: ButterflySystem) -> None:
        self._system = system

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        peers: Iterable[str] | str,
        *,
        config: ConfigSource = None,
        timeout: float | None = None,
        transport: Transport | None = None,
        secret: str | bytes | None = None,
    ) -> AsyncIterator[AsyncButterfly]:
        cfg = load_config(config)
        key = load_secret(secret, secret_file=cfg.network.secret_file)
        transport = transport or WebsocketTransport(cfg.network)
        seeds = _check_peers(peers, transport)
        check_timeout(timeout, "timeout")
        system = ButterflySystem(seeds, config=cfg, transport=transport, secret=key)
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(timeout or cfg.api.connect_timeout):
                        await nursery.start(system.run)
                except trio.TooSlowError:
                    from .errors import NetworkError

                    raise NetworkError(
                        f"the cluster was not ready within {timeout or cfg.api.connect_timeout:g} s"
                    ) from None
                try:
                    yield cls(system)
                finally:
                    system.stop()
        except BaseExceptionGroup as group:
            raise collapse(group) from group

    async def infer(self, x: Any, *, timeout: float | None = None) -> Any:
        return await self._system.infer(x, timeout=timeout)

    async def submit(
        self, x: Any, *, priority: int = 0, timeout: float | None = None
    ) -> AsyncTaskHandle:
        task, kind = self._system.submit(x, priority=priority, timeout=timeout)
        return AsyncTaskHandle(self._system, task, kind)

    async def infer_many(self, xs: Sequence[Any], *, timeout: float | None = None) -> list[Any]:
        return await self._system.infer_many(xs, timeout=timeout)

    async def generate(
        self, input_ids: Any, *, timeout: float | None = None, **sampling: Any
    ) -> Any:
        """See :meth:`Butterfly.generate`."""
        tokens, kind = self._system.stream(input_ids, timeout=timeout, **sampling)
        parts = [check_token_ids(input_ids)]
        async with aclosing(tokens):
            async for step in tokens:
                parts.append(step[:, None])
        return tokens_as(np.concatenate(parts, axis=1), kind)

    async def stream(
        self, input_ids: Any, *, timeout: float | None = None, **sampling: Any
    ) -> AsyncIterator[Any]:
        """See :meth:`Butterfly.stream`."""
        tokens, kind = self._system.stream(input_ids, timeout=timeout, **sampling)
        async with aclosing(tokens):
            async for step in tokens:
                yield tokens_as(step, kind)

    def cluster(self) -> ClusterInfo:
        return self._system.cluster()

    def metrics(self) -> MetricsSnapshot:
        return self._system.metrics.snapshot()

    def metrics_text(self) -> str:
        return self._system.metrics.exposition()

    def trace(self, task_id: int) -> list[Event]:
        _check_task_id(task_id)
        return self._system.metrics.trace(task_id)


class AsyncTaskHandle:
    """A submitted request, for trio programs."""

    def __init__(self, system: ButterflySystem, task: InferenceTask, kind: InputKind) -> None:
        self.task_id = task.task_id
        self._system = system
        self._task = task
        self._kind = kind

    async def result(self) -> Any:
        """Wait for the output or raise the task's error. Cancelling this wait cancels the task."""
        return await self._system.result(self._task, self._kind)

    def status(self) -> TaskStatus:
        return self._task.status

    def cancel(self) -> bool:
        return self._system.scheduling.cancel_task(self.task_id)


def _check_task_id(task_id: object) -> None:
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 1:
        raise ApiError(f"task_id must be a positive int (a handle's task_id), got {task_id!r}")
