"""The connection handshake as a small sans-IO state machine.

Both ends send a :class:`Hello` first. Until the peer's Hello has been accepted,
no other message is let through: a later authentication step slots in here,
before any payload is decoded for use.

    >>> hs = Handshake(local=my_hello, expect_model="pkg.mod:build", expect_fingerprint="ab12")
    >>> hs.receive(peer_hello)          # raises ProtocolError / FingerprintMismatch
    >>> hs.established
    True
"""

from __future__ import annotations

import enum

from ..errors import FingerprintMismatch, ProtocolError
from .messages import PROTOCOL_VERSION, Hello, Message

__all__ = ["Handshake", "HandshakeState"]

ROLES = frozenset({"coordinator", "link", "member", "worker"})
#: Longest heartbeat interval a peer may announce: a longer one would keep a dead
#: connection from ever being reaped.
MAX_HEARTBEAT_INTERVAL = 60.0


class HandshakeState(enum.Enum):
    AWAITING_HELLO = "awaiting-hello"
    ESTABLISHED = "established"
    FAILED = "failed"


class Handshake:
    """Validates the peer's Hello, then passes every later message through.

    ``expect_fingerprint`` (and ``expect_model``), when given, must equal the peer's:
    workers that serve different weights cannot be chained.
    """

    def __init__(
        self,
        local: Hello,
        *,
        expect_roles: frozenset[str] = ROLES,
        expect_model: str = "",
        expect_fingerprint: str = "",
    ) -> None:
        self.local = local
        self.expect_roles = expect_roles
        self.expect_model = expect_model
        self.expect_fingerprint = expect_fingerprint
        self.state = HandshakeState.AWAITING_HELLO
        self.peer: Hello | None = None

    @property
    def established(self) -> bool:
        return self.state is HandshakeState.ESTABLISHED

    def receive(self, message: Message) -> Message | None:
        """Feed one decoded message; returns it once established, ``None`` for the Hello."""
        if self.state is HandshakeState.ESTABLISHED:
            if isinstance(message, Hello):
                raise ProtocolError(f"peer {message.node_id!r} sent a second Hello")
            return message
        if self.state is HandshakeState.FAILED:
            raise ProtocolError("handshake already failed; the connection must be closed")
        try:
            self._check_hello(message)
        except BaseException:
            self.state = HandshakeState.FAILED
            raise
        self.state = HandshakeState.ESTABLISHED
        return None

    def _check_hello(self, message: Message) -> None:
        if not isinstance(message, Hello):
            raise ProtocolError(
                f"expected a Hello as the first message, got {type(message).__name__}"
            )
        if message.version != PROTOCOL_VERSION:
            raise ProtocolError(
                f"peer {message.node_id!r} speaks protocol version {message.version}; "
                f"this side speaks {PROTOCOL_VERSION}"
            )
        if not 0.0 <= message.heartbeat_interval <= MAX_HEARTBEAT_INTERVAL:  # NaN fails too
            raise ProtocolError(
                f"peer {message.node_id!r} announces a heartbeat interval of "
                f"{message.heartbeat_interval!r} s; expected 0 to {MAX_HEARTBEAT_INTERVAL:g} s"
            )
        if message.role not in self.expect_roles:
            raise ProtocolError(
                f"peer {message.node_id!r} has role {message.role!r}; "
                f"expected one of {sorted(self.expect_roles)}"
            )
        if self.expect_model and message.model_name != self.expect_model:
            raise FingerprintMismatch(
                f"peer {message.node_id!r} serves model {message.model_name!r}, "
                f"this side serves {self.expect_model!r}"
            )
        if self.expect_fingerprint and message.fingerprint != self.expect_fingerprint:
            raise FingerprintMismatch(
                f"peer {message.node_id!r} at {message.address or '?'} has weights fingerprint "
                f"{message.fingerprint[:16]}, this side has {self.expect_fingerprint[:16]}: the "
                "workers hold different weights. Give every worker the same --weights file; a "
                "factory without --weights must be deterministic (seed its random generator)."
            )
        self.peer = message
