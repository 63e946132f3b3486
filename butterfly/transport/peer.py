"""A connection that speaks Butterfly messages: handshake, typed decode, bounded send queue.

Every long-lived connection (coordinator→worker, worker→worker link) is wrapped in a
:class:`Peer` inside ``async with open_peer(...)``. When nothing is queued or being
written, a send is written at once by the sending task (two scheduler passes fewer on a
small message); otherwise it joins a bounded queue drained by one task, so a slow peer
makes its senders wait (backpressure) instead of growing memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..config import NetworkConfig
from ..errors import NetworkError, ProtocolError
from ..protocol import Handshake, Hello, Message, decode, encode, encode_parts
from .base import Buffer, Connection, Transport
from .retry import dial

__all__ = ["Peer", "dial_peer", "open_peer"]


class Peer:
    """Typed messages over a :class:`Connection`. Create it with :func:`open_peer`."""

    def __init__(self, conn: Connection, *, max_message_size: int, send_queue_size: int) -> None:
        self.conn = conn
        self.max_message_size = max_message_size
        self.hello: Hello | None = None
        self._queue_in, self._queue_out = trio.open_memory_channel[tuple[Buffer, ...]](
            send_queue_size
        )
        self._broken: NetworkError | None = None
        self._queued = 0  # in the queue, not yet written: a direct write must not overtake them
        self._writers = 0  # writes in progress (the connection serialises their frames)

    @property
    def remote(self) -> str:
        return self.conn.remote

    async def handshake(self, local: Hello, check: Handshake, *, timeout: float) -> Hello:
        """Send our Hello, validate theirs; raises ``ProtocolError`` or ``FingerprintMismatch``."""
        await self.conn.send(encode(local))
        with trio.move_on_after(timeout) as scope:
            frame = await self.conn.receive()
        if scope.cancelled_caught:
            raise NetworkError(f"{self.remote} did not complete the handshake within {timeout:g} s")
        check.receive(decode(frame, max_size=self.max_message_size))
        assert check.peer is not None
        self.hello = check.peer
        return check.peer

    async def send(self, message: Message) -> None:
        """Queue ``message``; waits while the queue is full. Raises ``NetworkError`` once broken."""
        parts = encode_parts(message)
        size = sum(len(p) for p in parts)
        if size > self.max_message_size:
            raise ProtocolError(
                f"{type(message).__name__} of {size} bytes exceeds max_message_size "
                f"{self.max_message_size}; raise network.max_message_size on every node"
            )
        if self._broken is not None:
            raise self._broken
        if not self._writers and not self._queued:
            await self._write(parts)
            return
        self._queued += 1
        try:
            await self._queue_in.send(parts)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._queued -= 1
            raise self._broken or NetworkError(f"connection to {self.remote} is closed") from None

    async def _write(self, parts: tuple[Buffer, ...]) -> None:
        self._writers += 1
        try:
            await self.conn.send(*parts)
        except NetworkError as exc:
            # Close both directions so the receive loop ends too; senders see the cause.
            self._broken = exc
            self._queue_out.close()
            with trio.CancelScope(shield=True):
                await self.conn.aclose()
            raise
        finally:
            self._writers -= 1

    async def receive(self) -> Message:
        """Next decoded message; raises ``NetworkError`` on close, ``ProtocolError`` on garbage."""
        return decode(await self.conn.receive(), max_size=self.max_message_size)

    async def _drain(self) -> None:
        try:
            async for parts in self._queue_out:
                self._queued -= 1
                await self._write(parts)
        except (NetworkError, trio.ClosedResourceError):
            pass


@asynccontextmanager
async def dial_peer(
    transport: Transport, address: str, config: NetworkConfig
) -> AsyncIterator[Peer]:
    """Connect to ``address`` (with the configured retries) and open a :class:`Peer` on it."""
    async with (
        dial(
            transport,
            address,
            attempts=config.reconnect_attempts,
            initial_delay=config.reconnect_initial_delay,
            max_delay=config.reconnect_max_delay,
        ) as conn,
        open_peer(
            conn, max_message_size=config.max_message_size, send_queue_size=config.send_queue_size
        ) as peer,
    ):
        yield peer


@asynccontextmanager
async def open_peer(
    conn: Connection, *, max_message_size: int, send_queue_size: int
) -> AsyncIterator[Peer]:
    """Run a :class:`Peer`'s sender for the duration of the block; pending sends are dropped on exit."""
    peer = Peer(conn, max_message_size=max_message_size, send_queue_size=send_queue_size)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer._drain)
        try:
            yield peer
        finally:
            nursery.cancel_scope.cancel()
