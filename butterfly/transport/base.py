"""The transport interface: byte frames over a connection, nothing more.

Two adapters implement it: :mod:`.memory` (one process, for protocol tests) and
:mod:`.websocket` (real sockets). The layers above never know which one they use.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import trio

__all__ = ["Buffer", "Connection", "ConnectionHandler", "Transport"]

#: What a message is made of on the way in and out.
Buffer = bytes | bytearray | memoryview


class Connection(Protocol):
    """One bidirectional, message-framed connection.

    ``send(*parts)`` sends one message: the concatenation of ``parts`` (so a large
    payload can be sent from its own memory, without first joining it to a header).
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

    async def send(self, *parts: Buffer) -> None: ...

    async def receive(self) -> Buffer: ...

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
