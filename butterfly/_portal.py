"""The background trio thread behind the blocking facade (DESIGN.md rule 5).

One thread runs ``trio.run``; each blocking call starts a task in the portal's
nursery and waits on a ``concurrent.futures.Future``. A KeyboardInterrupt while
waiting cancels that task. Closing stops the service (which drains), then joins.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from ._errors import collapse
from .errors import ApiError, ButterflyError, NetworkError

__all__ = ["Portal", "refuse_inside_trio"]

T = TypeVar("T")


def refuse_inside_trio(what: str) -> None:
    """Blocking calls inside a trio run would deadlock that run: refuse them clearly."""
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return
    raise ApiError(
        f"{what} blocks and cannot be called from inside a trio run; "
        "use `async with AsyncButterfly.connect(...)` there instead"
    )


class Portal:
    """Runs a service in a background trio thread and lets other threads call into it."""

    def __init__(self, name: str = "butterfly-trio") -> None:
        self._thread = threading.Thread(target=self._thread_main, name=name, daemon=True)
        self._started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._outstanding: set[concurrent.futures.Future[Any]] = set()
        self._lock = threading.Lock()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._service: Callable[..., Awaitable[None]] | None = None
        self._timeout = 0.0

    def start(self, service: Callable[..., Awaitable[None]], *, timeout: float) -> None:
        """Start ``service(task_status=...)`` in the thread; returns once it reported ready."""
        self._service = service
        self._timeout = timeout
        self._thread.start()
        try:
            self._started.result()
        except BaseException:
            self._thread.join()
            raise

    def _thread_main(self) -> None:
        error: BaseException | None = None
        try:
            trio.run(self._main)
        except BaseException as exc:
            error = collapse(exc)
        with self._lock:
            self._closed = True
            leftovers = [f for f in self._outstanding if not f.done()]
        if not self._started.done():
            self._started.set_exception(
                error or ButterflyError("the service stopped before it was ready")
            )
        for future in leftovers:
            future.set_exception(
                ButterflyError(f"Butterfly's background thread stopped: {error!r}")
            )

    async def _main(self) -> None:
        assert self._service is not None
        service = self._service
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._token = trio.lowlevel.current_trio_token()

            async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                await service(task_status=task_status)
                nursery.cancel_scope.cancel()  # the service drained: end leftover calls too

            try:
                with trio.fail_after(self._timeout):
                    await nursery.start(serve)
            except trio.TooSlowError:
                raise NetworkError(
                    f"the cluster was not ready within {self._timeout:g} s (api.connect_timeout)"
                ) from None
            self._started.set_result(None)

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``await fn(*args)`` in the trio thread and wait for its result in this thread."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        scope = trio.CancelScope()

        async def runner() -> None:
            with scope:
                try:
                    future.set_result(await fn(*args))
                except trio.Cancelled:
                    future.set_exception(ApiError("the call was cancelled"))
                    raise
                except BaseException as exc:  # the caller's thread re-raises it
                    future.set_exception(collapse(exc))
            if not future.done():
                future.set_exception(ApiError("the call was cancelled"))

        with self._lock:
            if self._closed or self._token is None:
                raise ApiError("this Butterfly is closed")
            self._outstanding.add(future)
        try:
            assert self._nursery is not None
            trio.from_thread.run_sync(self._nursery.start_soon, runner, trio_token=self._token)
        except (trio.RunFinishedError, RuntimeError):  # RuntimeError: the nursery is closing
            raise ApiError("this Butterfly is closed") from None
        try:
            return future.result()
        except KeyboardInterrupt:
            self._cancel(scope)
            raise
        finally:
            with self._lock:
                self._outstanding.discard(future)

    def _cancel(self, scope: trio.CancelScope) -> None:
        try:
            trio.from_thread.run_sync(scope.cancel, trio_token=self._token)
        except trio.RunFinishedError:
            pass

    def run_sync_soon(self, fn: Callable[[], object]) -> None:
        """Run a plain function in the trio thread (e.g. to ask the service to stop)."""
        if self._token is None:
            return
        try:
            trio.from_thread.run_sync(fn, trio_token=self._token)
        except trio.RunFinishedError:
            pass

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
