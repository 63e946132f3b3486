"""Mutual authentication and per-frame integrity, sans-IO (see docs/security.md).

Before any Butterfly message is decoded, both ends of a connection prove that they hold
the shared secret, without sending it:

1. each side sends an *offer*: ``OFFER_MAGIC`` and 32 fresh random bytes (its nonce);
2. each side sends its *proof*: HMAC-SHA256 of both nonces under the secret, labelled
   with its side of the connection (``dialer`` or ``acceptor``) so that a proof can be
   neither reflected back to its author nor replayed on another connection (the nonces
   are fresh on both sides);
3. each side checks the other's proof with :func:`hmac.compare_digest`.

Both sides then derive one key per direction with HKDF-SHA256 (RFC 5869, from the
``cryptography`` package, which Butterfly needs for the MAC anyway) from the secret,
salted with both nonces: a key never outlives its connection.

Every later frame carries a 16-byte tag: AES-GMAC (AES-256-GCM over an empty plaintext,
the frame as associated data) with the frame's sequence number in its direction as the
nonce. The sequence number is implicit — each side counts — so a replayed, reordered,
dropped or altered frame fails its tag, and the connection is closed. GMAC was chosen for
speed: about 25 GB/s with AES-NI against about 2 GB/s for HMAC-SHA256 and 1 GB/s for
keyed BLAKE2b here, and a 4 MiB activation must pay for it twice (seal and open).

Frames are authenticated, not encrypted: use TLS (``wss://``) where the activations
themselves are confidential.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import AuthenticationError

__all__ = [
    "OFFER_MAGIC",
    "PROOF_MAGIC",
    "SECRET_MIN_BYTES",
    "TAG_BYTES",
    "Authenticator",
    "FrameCheck",
    "FrameMac",
    "FrameSeal",
    "is_offer",
]

OFFER_MAGIC = b"BFLYAUTH\x01"
PROOF_MAGIC = b"BFLYPROOF\x01"
NONCE_BYTES = 32
TAG_BYTES = 16
#: A shorter secret could be guessed offline from one recorded handshake.
SECRET_MIN_BYTES = 16
_JOIN_LIMIT = 64 << 10

_SIDES = (b"dialer", b"acceptor")

Buffer = bytes | bytearray | memoryview


def is_offer(frame: Buffer) -> bool:
    """Whether ``frame`` is an authentication offer (sent first by a side that has a secret)."""
    return bytes(frame[: len(OFFER_MAGIC)]) == OFFER_MAGIC


class Authenticator:
    """One side of the challenge–response of one connection.

    >>> a, b = Authenticator(s, dialer=True, peer="w"), Authenticator(s, dialer=False, peer="c")
    >>> seal_a = a.check_proof(b.proof(a.offer()))   # after a.proof(b.offer()) on the way
    """

    def __init__(self, secret: bytes, *, dialer: bool, peer: str) -> None:
        if len(secret) < SECRET_MIN_BYTES:
            raise AuthenticationError(
                f"the shared secret has {len(secret)} bytes; at least {SECRET_MIN_BYTES} expected"
            )
        self._secret = secret
        self._dialer = dialer
        self.peer = peer
        self._nonce = secrets.token_bytes(NONCE_BYTES)
        self._peer_nonce: bytes | None = None

    def offer(self) -> bytes:
        return OFFER_MAGIC + self._nonce

    def proof(self, peer_offer: Buffer) -> bytes:
        """Our proof, once the peer's offer has arrived."""
        frame = bytes(peer_offer)
        if not is_offer(frame) or len(frame) != len(OFFER_MAGIC) + NONCE_BYTES:
            raise AuthenticationError(
                f"{self.peer} did not offer authentication: it has no shared secret, or "
                "it is not a Butterfly node of this version"
            )
        self._peer_nonce = frame[len(OFFER_MAGIC) :]
        return PROOF_MAGIC + self._mac(self._dialer)

    def check_proof(self, peer_proof: Buffer) -> FrameSeal:
        """Check the peer's proof; the frame seal of this connection when it is right."""
        assert self._peer_nonce is not None, "proof() first"
        frame = bytes(peer_proof)
        expected = PROOF_MAGIC + self._mac(not self._dialer)
        if not hmac.compare_digest(frame, expected):
            raise AuthenticationError(
                f"{self.peer} did not prove the shared secret: the two sides have different secrets"
            )
        dialer_nonce, acceptor_nonce = self._nonces()
        keys = HKDF(
            algorithm=hashes.SHA256(),
            length=64,
            salt=dialer_nonce + acceptor_nonce,
            info=b"butterfly frame keys v1",
        ).derive(self._secret)
        dialer_key, acceptor_key = keys[:32], keys[32:]
        if self._dialer:
            return FrameSeal(send_key=dialer_key, receive_key=acceptor_key, peer=self.peer)
        return FrameSeal(send_key=acceptor_key, receive_key=dialer_key, peer=self.peer)

    def _nonces(self) -> tuple[bytes, bytes]:
        assert self._peer_nonce is not None
        if self._dialer:
            return self._nonce, self._peer_nonce
        return self._peer_nonce, self._nonce

    def _mac(self, dialer: bool) -> bytes:
        dialer_nonce, acceptor_nonce = self._nonces()
        label = b"butterfly proof v1 " + _SIDES[0 if dialer else 1]
        return hmac.digest(self._secret, label + dialer_nonce + acceptor_nonce, hashlib.sha256)


class FrameSeal:
    """Tags outgoing frames and checks incoming ones, each direction with its own key and count.

    ``outgoing()`` must be called in the order the frames are written, and ``incoming()``
    in the order they are received: the count is the GCM nonce. Each gives a MAC fed
    with the frame's bytes as they are written or arrive, so that the MAC of a large frame
    overlaps its transfer instead of adding to it.
    """

    def __init__(self, *, send_key: bytes, receive_key: bytes, peer: str) -> None:
        self._send = _Direction(send_key)
        self._receive = _Direction(receive_key)
        self._sent = 0
        self._received = 0
        self.peer = peer

    def outgoing(self) -> FrameMac:
        """The MAC of the next frame sent; its ``finish()`` is the tag to append."""
        return FrameMac(self._send, self._next_sent)

    def incoming(self) -> FrameCheck:
        """The check of the next frame received; ``verify(tag)`` once it has all the bytes.
        It takes its number when its tag is computed, so a receive cancelled before any
        frame arrived costs no number."""
        return FrameCheck(self._receive, self._next_received, self.peer)

    def _next_sent(self) -> int:
        self._sent += 1
        return self._sent - 1

    def _next_received(self) -> int:
        self._received += 1
        return self._received - 1

    def tag(self, parts: tuple[Buffer, ...]) -> bytes:
        """The tag to append to the next frame sent, made of ``parts``."""
        mac = self.outgoing()
        for part in parts:
            mac.update(part)
        return mac.finish()

    def open(self, frame: Buffer) -> memoryview:
        """The next frame received without its tag; raises ``AuthenticationError`` if the
        tag is wrong."""
        return self.incoming().open(frame)


class _Direction:
    def __init__(self, key: bytes) -> None:
        self.aes = algorithms.AES(key)
        self.aead = AESGCM(key)


class FrameMac:
    """AES-GMAC of one frame, fed in pieces. Up to ``_JOIN_LIMIT`` bytes are collected and
    tagged in one call (every small frame, however many parts it has); beyond that the
    incremental interface takes over, whose set-up (about 2 µs) only a large frame can
    amortise."""

    size = TAG_BYTES

    def __init__(self, direction: _Direction, take_number: Callable[[], int]) -> None:
        self._direction = direction
        self._take_number = take_number
        self.number = -1  # taken when first needed
        self._small: bytearray | None = bytearray()  # None once incremental
        self._encryptor: Any = None

    @property
    def _nonce(self) -> bytes:
        # One frame at a time is fed in each direction, so numbers are taken in frame order.
        if self.number < 0:
            self.number = self._take_number()
        return _nonce(self.number)

    def update(self, data: Buffer) -> None:
        if self._small is not None:
            if len(self._small) + len(data) <= _JOIN_LIMIT:
                self._small += data
                return
            self._encryptor = Cipher(self._direction.aes, modes.GCM(self._nonce)).encryptor()
            self._encryptor.authenticate_additional_data(self._small)
            self._small = None
        self._encryptor.authenticate_additional_data(data)

    def finish(self) -> bytes:
        if self._small is not None:
            return self._direction.aead.encrypt(self._nonce, b"", bytes(self._small))
        self._encryptor.finalize()
        tag: bytes = self._encryptor.tag
        return tag


class FrameCheck(FrameMac):
    """The MAC of one received frame, compared with the tag it arrived with."""

    def __init__(self, direction: _Direction, take_number: Callable[[], int], peer: str) -> None:
        super().__init__(direction, take_number)
        self._peer = peer

    def verify(self, tag: Buffer) -> None:
        """Raises ``AuthenticationError`` unless ``tag`` is the frame's (fed so far)."""
        expected = self.finish()
        if len(tag) != TAG_BYTES:
            raise AuthenticationError(
                f"frame {self.number} from {self._peer} is too short for a tag"
            )
        if not hmac.compare_digest(expected, bytes(tag)):
            raise AuthenticationError(
                f"frame {self.number} from {self._peer} failed its integrity check (altered, "
                "replayed, reordered or dropped); the connection is closed"
            )

    def open(self, frame: Buffer) -> memoryview:
        """``frame`` without its tag, once the tag is checked (a frame received whole)."""
        view = memoryview(frame)
        if len(view) < TAG_BYTES:
            self.verify(b"")
        body = view[:-TAG_BYTES]
        self.update(body)
        self.verify(view[-TAG_BYTES:])
        return body


def _nonce(number: int) -> bytes:
    return number.to_bytes(12, "big")
