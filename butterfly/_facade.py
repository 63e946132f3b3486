"""The public entry points: :class:`Butterfly` (blocking) and :class:`AsyncButterfly` (trio)."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from ._errors import collapse
from ._local import LocalCluster
from ._portal import Portal, refuse_inside_trio
from .config import ButterflyConfig, load_config
from .errors import ApiError, ButterflyError
from .system import ButterflySystem
from .transport import Transport, WebsocketTransport
from .types import ClusterInfo

__all__ = ["AsyncButterfly", "Butterfly"]

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


def _check_timeout(timeout: float | None, what: str) -> None:
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
    ):
        raise ApiError(f"{what} must be a positive number of seconds or None, got {timeout!r}")


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
    ) -> Butterfly:
        """Discover the cluster from ``peers``, place the model, and return a ready client.

        Raises ``NetworkError`` naming the addresses tried when no worker answers, and
        ``FingerprintMismatch`` when the workers hold different weights.
        """
        refuse_inside_trio("Butterfly.connect")
        cfg = load_config(config)
        transport = transport or WebsocketTransport(cfg.network)
        seeds = _check_peers(peers, transport)
        _check_timeout(timeout, "timeout")
        system = ButterflySystem(seeds, config=cfg, transport=transport)
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
        """
        refuse_inside_trio("Butterfly.local")
        cluster = LocalCluster(model, workers, **worker_options)
        try:
            client = cls.connect(cluster.addresses, config=config, timeout=timeout)
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
        _check_timeout(timeout, "timeout")
        return self._portal.call(functools.partial(self._system.infer, timeout=timeout), x)

    def cluster(self) -> ClusterInfo:
        """The workers (id, address, state) and the current placement."""
        return self._portal.call(_sync_to_async(self._system.cluster))

    def metrics(self) -> dict[str, object]:
        """A snapshot of the coordinator's metrics (request counts, latency percentiles)."""
        return self._portal.call(_sync_to_async(self._system.metrics.snapshot))

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
    ) -> AsyncIterator[AsyncButterfly]:
        cfg = load_config(config)
        transport = transport or WebsocketTransport(cfg.network)
        seeds = _check_peers(peers, transport)
        _check_timeout(timeout, "timeout")
        system = ButterflySystem(seeds, config=cfg, transport=transport)
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
        _check_timeout(timeout, "timeout")
        return await self._system.infer(x, timeout=timeout)

    def cluster(self) -> ClusterInfo:
        return self._system.cluster()

    def metrics(self) -> dict[str, object]:
        return self._system.metrics.snapshot()
