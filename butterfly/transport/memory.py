"""In-memory transport: connections are pairs of bounded trio memory channels.

For protocol and service tests in one process (and with ``MockClock``). It enforces
the same ``max_message_size`` as the websocket adapter so tests see the same limits.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..errors import NetworkError, ProtocolError
from .base import Buffer, Check, Connection, ConnectionHandler, Mac, opened, sealed

__all__ = ["MemoryConnection", "MemoryNetwork"]

log = logging.getLogger(__name__)


class MemoryConnection:
    """One end of an in-memory connection."""

    def __init__(
        self,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
        *,
        remote: str,
        max_message_size: int,
    ) -> None:
        self._send = send
        self._receive = receive
        self._remote = remote
        self.max_message_size = max_message_size

    @property
    def remote(self) -> str:
        return self._remote

    async def send(self, *parts: Buffer, mac: Mac | None = None) -> None:
        frame = b"".join(sealed(parts, mac))
        if len(frame) > self.max_message_size:
            # Like a websocket peer answering 1009 (message too big): the link is lost.
            await self.aclose()
            raise NetworkError(
                f"frame of {len(frame)} bytes to {self._remote} exceeds max_message_size "
                f"{self.max_message_size}"
            )
        try:
            await self._send.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise NetworkError(f"connection to {self._remote} is closed") from exc

    async def receive(self, check: Check | None = None) -> Buffer:
        try:
            frame = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise NetworkError(f"connection to {self._remote} is closed") from exc
        if len(frame) > self.max_message_size:  # this side's limit may be the lower one
            await self.aclose()
            raise ProtocolError(
                f"{self._remote}: message of more than {self.max_message_size} bytes "
                "(max_message_size)"
            )
        return opened(frame, check)

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()

    async def abort(self) -> None:
        await self.aclose()


class MemoryNetwork:
    """A namespace of in-memory listeners; implements the :class:`Transport` interface."""

    def __init__(self, *, max_message_size: int = 1 << 30, buffer: int = 16) -> None:
        self._listeners: dict[str, trio.MemorySendChannel[Connection]] = {}
        self._max_message_size = max_message_size
        self._buffer = buffer
        self._ids = itertools.count()

    def _pair(self, client: str, server: str) -> tuple[Connection, Connection]:
        """Both ends of a new connection from ``client`` to ``server``: (client's, server's)."""
        to_server_send, to_server_recv = trio.open_memory_channel[bytes](self._buffer)
        to_client_send, to_client_recv = trio.open_memory_channel[bytes](self._buffer)
        size = self._max_message_size
        return (
            MemoryConnection(to_server_send, to_client_recv, remote=server, max_message_size=size),
            MemoryConnection(to_client_send, to_server_recv, remote=client, max_message_size=size),
        )

    def validate_address(self, address: str) -> None:
        if not address:
            raise NetworkError("empty address")

    @asynccontextmanager
    async def connect(self, address: str, *, local: str = "") -> AsyncIterator[Connection]:
        """Connect to ``address``; ``local`` names this end (default: a fresh ``client-N``)."""
        listener = self._listeners.get(address)
        if listener is None:
            raise NetworkError(f"nothing listens on {address}")
        client, server = self._pair(local or f"client-{next(self._ids)}", address)
        try:
            await listener.send(server)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise NetworkError(f"nothing listens on {address}") from exc
        try:
            yield client
        finally:
            await client.aclose()

    async def serve(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if address in self._listeners:
            raise NetworkError(f"{address} is already in use")
        send, receive = trio.open_memory_channel[Connection](self._buffer)
        self._listeners[address] = send
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(address)
                async for conn in receive:
                    nursery.start_soon(_handle, handler, conn)
        finally:
            del self._listeners[address]
            send.close()


async def _handle(handler: ConnectionHandler, conn: Connection) -> None:
    try:
        await handler(conn)
    except Exception as exc:
        # Like the websocket server: one connection's failure never takes the listener down.
        log.info("connection %s ended: %r", conn.remote, exc)
    finally:
        await conn.aclose()
