"""A connection that speaks Butterfly messages: handshake, typed decode, bounded send queue.

Every long-lived connection (coordinator→worker, worker→worker link) is wrapped in a
:class:`Peer` inside ``async with open_peer(...)``. When nothing is queued or being
written, a send is written at once by the sending task (two scheduler passes fewer on a
small message); otherwise it joins a bounded queue drained by one task, so a slow peer
makes its senders wait (backpressure) instead of growing memory.

With a shared secret, the handshake first runs the challenge–response of
:mod:`butterfly.protocol.auth`; from then on every frame carries a tag (sequence number and
MAC) and a frame whose tag is wrong closes the connection (``AuthenticationError``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from ..config import NetworkConfig
from ..errors import AuthenticationError, NetworkError, ProtocolError
from ..protocol import Handshake, Hello, Message, decode, encode_parts
from ..protocol.auth import TAG_BYTES, Authenticator, FrameSeal, is_offer
from .base import Buffer, Connection, Transport
from .retry import dial

__all__ = ["HANDSHAKE_MESSAGE_SIZE", "Peer", "dial_peer", "open_peer"]

#: Largest frame read during the handshake (offers, proofs and Hellos are far smaller).
HANDSHAKE_MESSAGE_SIZE = 64 << 10


class Peer:
    """Typed messages over a :class:`Connection`. Create it with :func:`open_peer`."""

    def __init__(
        self,
        conn: Connection,
        *,
        max_message_size: int,
        send_queue_size: int,
        secret: bytes | None = None,
        dialer: bool = False,
    ) -> None:
        self.conn = conn
        self.max_message_size = max_message_size
        self.hello: Hello | None = None
        self._secret = secret
        self._dialer = dialer
        self._seal: FrameSeal | None = None
        # Tags are numbered in the order frames are written: one writer at a time.
        self._write_lock = trio.Lock()
        self._queue_in, self._queue_out = trio.open_memory_channel[tuple[Buffer, ...]](
            send_queue_size
        )
        self._broken: NetworkError | None = None
        self._queued = 0  # in the queue, not yet written: a direct write must not overtake them
        self._writers = 0  # writes in progress (the connection serialises their frames)
        #: Bytes of messages written to and received from the peer (for a worker's /metrics).
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def remote(self) -> str:
        return self.conn.remote

    @property
    def authenticated(self) -> bool:
        """Whether the peer proved the shared secret (every frame is then tagged)."""
        return self._seal is not None

    async def handshake(self, local: Hello, check: Handshake, *, timeout: float) -> Hello:
        """Authenticate (with a secret), send our Hello, validate theirs — all within ``timeout``.

        Raises ``AuthenticationError``, ``ProtocolError``, ``FingerprintMismatch``, or
        ``NetworkError`` when the peer does not finish in time.
        """
        # Until the peer is known, no large frame is read from it (an unauthenticated peer
        # must not make us buffer up to max_message_size per connection).
        self.conn.max_message_size = min(HANDSHAKE_MESSAGE_SIZE, self.max_message_size)
        with trio.move_on_after(timeout) as scope:
            if self._secret is not None:
                await self._authenticate(self._secret)
            await self._write(encode_parts(local))
            frame = await self._receive_frame()
        if scope.cancelled_caught:
            raise NetworkError(f"{self.remote} did not complete the handshake within {timeout:g} s")
        if self._secret is None and is_offer(frame):
            raise AuthenticationError(
                f"{self.remote} authenticates with a shared secret and this side has none: give "
                "it the cluster's secret (secret=, network.secret_file, --secret-file or "
                "BUTTERFLY_SECRET)"
            )
        check.receive(decode(frame, max_size=self.max_message_size))
        assert check.peer is not None
        self.hello = check.peer
        self.conn.max_message_size = self.max_message_size
        return check.peer

    async def _authenticate(self, secret: bytes) -> None:
        auth = Authenticator(secret, dialer=self._dialer, peer=self.remote)
        await self.conn.send(auth.offer())
        await self.conn.send(auth.proof(await self.conn.receive()))
        self._seal = auth.check_proof(await self.conn.receive())

    async def send(self, message: Message) -> None:
        """Queue ``message``; waits while the queue is full. Raises ``NetworkError`` once broken."""
        parts = self._encode(message)
        if not self._writers and not self._queued:
            await self._write(parts)
            return
        self._queued += 1
        try:
            await self._queue_in.send(parts)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._queued -= 1
            raise self._broken or NetworkError(f"connection to {self.remote} is closed") from None

    def send_nowait(self, message: Message) -> bool:
        """Queue ``message`` without waiting; ``False`` when the queue is full (the peer is
        not reading). Raises ``NetworkError`` once broken."""
        parts = self._encode(message)
        self._queued += 1
        try:
            self._queue_in.send_nowait(parts)
        except trio.WouldBlock:
            self._queued -= 1
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._queued -= 1
            raise self._broken or NetworkError(f"connection to {self.remote} is closed") from None
        return True

    def _encode(self, message: Message) -> tuple[Buffer, ...]:
        parts = encode_parts(message)
        size = sum(len(p) for p in parts) + (TAG_BYTES if self._seal is not None else 0)
        if size > self.max_message_size:
            raise ProtocolError(
                f"{type(message).__name__} of {size} bytes exceeds max_message_size "
                f"{self.max_message_size}; raise network.max_message_size on every node"
            )
        if self._broken is not None:
            raise self._broken
        return parts

    async def _write(self, parts: tuple[Buffer, ...]) -> None:
        self._writers += 1
        self.bytes_sent += sum(len(p) for p in parts)
        try:
            if self._seal is None:
                await self.conn.send(*parts)
                return
            # Uncontended, the lock is taken without a checkpoint (a 4 KiB round trip pays
            # for each one). Once a tag is numbered its frame must go out, so the write is
            # shielded; aclose() still ends a write stuck on a dead peer.
            if not self._write_lock.locked():
                self._write_lock.acquire_nowait()
            else:
                await self._write_lock.acquire()
            try:
                mac = self._seal.outgoing()
                with trio.CancelScope(shield=True):
                    await self.conn.send(*parts, mac=mac)
            finally:
                self._write_lock.release()
        except NetworkError as exc:
            await self._break(exc)
            raise
        finally:
            self._writers -= 1

    async def receive(self) -> Message:
        """Next decoded message; raises ``NetworkError`` on close, ``ProtocolError`` on garbage,
        ``AuthenticationError`` (and closes the connection) on a frame with a wrong tag."""
        message = decode(await self._receive_frame(), max_size=self.max_message_size)
        if isinstance(message, Hello):
            raise ProtocolError(f"{self.remote} sent a second Hello after the handshake")
        return message

    async def _receive_frame(self) -> Buffer:
        if self._seal is None:
            frame = await self.conn.receive()
        else:
            try:
                frame = await self.conn.receive(check=self._seal.incoming())
            except AuthenticationError as exc:
                await self._break(exc)
                raise
        self.bytes_received += len(frame)
        return frame

    async def _break(self, cause: NetworkError) -> None:
        # Close both directions so the receive loop ends too; senders see the cause.
        self._broken = cause
        self._queue_out.close()
        with trio.CancelScope(shield=True):
            await self.conn.aclose()

    async def _drain(self) -> None:
        try:
            async for parts in self._queue_out:
                self._queued -= 1
                await self._write(parts)
        except (NetworkError, trio.ClosedResourceError):
            pass


@asynccontextmanager
async def dial_peer(
    transport: Transport, address: str, config: NetworkConfig, *, secret: bytes | None = None
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
            conn,
            max_message_size=config.max_message_size,
            send_queue_size=config.send_queue_size,
            secret=secret,
            dialer=True,
        ) as peer,
    ):
        yield peer


@asynccontextmanager
async def open_peer(
    conn: Connection,
    *,
    max_message_size: int,
    send_queue_size: int,
    secret: bytes | None = None,
    dialer: bool = False,
) -> AsyncIterator[Peer]:
    """Run a :class:`Peer`'s sender for the duration of the block; pending sends are dropped on exit.

    With ``secret``, the handshake authenticates both sides and every frame is tagged;
    ``dialer`` says which side of the connection this is (the proofs of the two differ).
    """
    peer = Peer(
        conn,
        max_message_size=max_message_size,
        send_queue_size=send_queue_size,
        secret=secret,
        dialer=dialer,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peer._drain)
        try:
            yield peer
        finally:
            nursery.cancel_scope.cancel()
