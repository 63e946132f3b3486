"""The transport interface: byte frames over a connection, nothing more.

Two adapters implement it: :mod:`.memory` (one process, for protocol tests) and
:mod:`.websocket` (real sockets). The layers above never know which one they use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import trio

__all__ = ["Buffer", "Check", "Connection", "ConnectionHandler", "Mac", "Transport"]

#: What a message is made of on the way in and out.
Buffer = bytes | bytearray | memoryview


class Mac(Protocol):
    """A frame's MAC, fed with its bytes in order (``butterfly.protocol.auth.FrameMac``)."""

    size: int

    def update(self, data: Buffer) -> None: ...

    def finish(self) -> bytes: ...


class Check(Mac, Protocol):
    """A received frame's MAC and the comparison with its tag (``FrameCheck``)."""

    def verify(self, tag: Buffer) -> None:
        """Raise ``AuthenticationError`` unless ``tag`` is the MAC of what was fed."""
        ...

    def open(self, frame: Buffer) -> Buffer:
        """``frame`` without its tag, checked (a frame received at once)."""
        ...


def sealed(parts: tuple[Buffer, ...], mac: Mac | None) -> tuple[Buffer, ...]:
    """``parts`` followed by their tag, for a transport that writes a frame at once."""
    if mac is None:
        return parts
    for part in parts:
        mac.update(part)
    return (*parts, mac.finish())


def opened(frame: Buffer, check: Check | None) -> Buffer:
    """``frame`` without its tag, checked, for a transport that receives a frame at once."""
    return frame if check is None else check.open(frame)


class Connection(Protocol):
    """One bidirectional, message-framed connection.

    ``send(*parts)`` sends one message: the concatenation of ``parts`` (so a large
    payload can be sent from its own memory, without first joining it to a header).
    With ``mac``, the message is followed by its tag (``mac.finish()``), and with
    ``check`` the last ``check.size`` bytes of the message received are its tag, checked
    before it is returned without them: the connection feeds the MAC as the bytes go out
    or come in, so that a large frame's MAC overlaps its transfer.
    ``send`` and ``receive`` raise :class:`~butterfly.errors.NetworkError` once the
    connection is closed or broken, and ``ProtocolError`` for a frame that is not binary.
    """

    @property
    def remote(self) -> str:
        """A human-readable description of the other end, for error messages."""
        ...

    #: Largest message accepted from the peer; a larger one closes the connection (1009)
    #: before its payload is read. Lowered during the handshake (see ``Peer.handshake``).
    max_message_size: int

    async def send(self, *parts: Buffer, mac: Mac | None = None) -> None: ...

    async def receive(self, check: Check | None = None) -> Buffer: ...

    async def aclose(self) -> None: ...

    async def abort(self) -> None:
        """Close at once, without the closing handshake: a task blocked sending or receiving
        on the connection (a peer that stopped reading) gets ``NetworkError``."""
        ...


ConnectionHandler = Callable[[Connection], Awaitable[None]]


class Transport(Protocol):
    """Opens connections to addresses and serves incoming ones."""

    def validate_address(self, address: str) -> None:
        """Raise ``NetworkError`` if ``address`` is not one this transport can dial."""
        ...

    def connect(self, address: str) -> AbstractAsyncContextManager[Connection]:
        """Open a connection for the duration of the ``async with`` block."""
        ...

    async def serve(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``address`` and run ``handler`` for each, until cancelled.

        Reports the bound address (with the real port when 0 was asked) through ``task_status``.
        """
        ...
