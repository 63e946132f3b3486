"""Sans-IO pieces of RFC 6455 (websocket) framing: headers, masking, close codes, the accept key.

Butterfly moves megabytes per message, so framing is written for bulk binary data:
the payload is never concatenated with its header, masking runs in numpy over 32-bit
words (wsproto masks byte by byte in Python), and a receiver can read a payload
straight into a buffer of the announced size. Nothing here does I/O.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import struct

import attrs
import numpy as np

from ..errors import ProtocolError

__all__ = [
    "CloseCode",
    "FrameHeader",
    "InvalidPayload",
    "Opcode",
    "accept_key",
    "close_payload",
    "encode_header",
    "mask",
    "masked_copy",
    "parse_close",
    "parse_header",
    "valid_close_code",
    "valid_key",
]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Control frames carry at most this many payload bytes (RFC 6455 §5.5).
MAX_CONTROL_PAYLOAD = 125


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA

    @property
    def is_control(self) -> bool:
        return self >= 0x8


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    INVALID_PAYLOAD = 1007
    MESSAGE_TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013


def valid_close_code(code: int) -> bool:
    """Whether a peer may send ``code`` in a close frame (RFC 6455 §7.4; 1004–1006 and 1015
    are reserved, 3000–4999 are for libraries and applications). 1014 and 1016–2999 are
    refused as wsproto refuses them: the two framers must agree (tests/transport/test_differential.py)."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1013 or 3000 <= code <= 4999


def valid_key(key: bytes) -> bool:
    """Whether ``key`` is a ``Sec-WebSocket-Key``: base64 of 16 bytes (RFC 6455 §4.1)."""
    try:
        return len(base64.b64decode(key.strip(), validate=True)) == 16
    except ValueError:
        return False


def accept_key(key: str | bytes) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    raw = key.encode() if isinstance(key, str) else key
    return base64.b64encode(hashlib.sha1(raw.strip() + _GUID).digest()).decode()


@attrs.frozen
class FrameHeader:
    fin: bool
    opcode: Opcode
    length: int
    mask_key: bytes | None
    #: Bytes the header itself took (2 to 14).
    size: int


def encode_header(
    opcode: Opcode, length: int, *, fin: bool = True, mask_key: bytes | None = None
) -> bytes:
    """The header of one frame whose payload is ``length`` bytes (masked when ``mask_key`` is given)."""
    first = (0x80 if fin else 0) | int(opcode)
    mask_bit = 0x80 if mask_key is not None else 0
    if length < 126:
        head = struct.pack("!BB", first, mask_bit | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    return head + mask_key if mask_key is not None else head


def parse_header(data: bytes | bytearray | memoryview) -> FrameHeader | None:
    """Parse a frame header at the start of ``data``; ``None`` until enough bytes are there.

    Raises ``ProtocolError`` for reserved bits (no extension is negotiated), unknown
    opcodes and malformed control frames.
    """
    if len(data) < 2:
        return None
    b0, b1 = data[0], data[1]
    if b0 & 0x70:
        raise ProtocolError("websocket frame uses reserved bits, but no extension was negotiated")
    try:
        opcode = Opcode(b0 & 0x0F)
    except ValueError:
        raise ProtocolError(f"unknown websocket opcode {b0 & 0x0F:#x}") from None
    fin = bool(b0 & 0x80)
    masked = bool(b1 & 0x80)
    length = b1 & 0x7F
    # Known from the first two bytes: refuse at once, as wsproto does.
    if opcode.is_control and (not fin or length > MAX_CONTROL_PAYLOAD):
        raise ProtocolError(f"websocket {opcode.name} frame is fragmented or longer than 125 bytes")
    size = 2
    if length == 126:
        if len(data) < 4:
            return None
        (length,) = struct.unpack_from("!H", data, 2)
        size = 4
    elif length == 127:
        if len(data) < 10:
            return None
        (length,) = struct.unpack_from("!Q", data, 2)
        if length >> 63:
            raise ProtocolError("websocket frame length has its most significant bit set")
        size = 10
    mask_key = None
    if masked:
        if len(data) < size + 4:
            return None
        mask_key = bytes(data[size : size + 4])
        size += 4
    return FrameHeader(fin=fin, opcode=opcode, length=length, mask_key=mask_key, size=size)


def mask(buffer: bytearray | memoryview, mask_key: bytes, *, offset: int = 0) -> None:
    """XOR ``buffer`` in place with ``mask_key``, as if it started ``offset`` bytes into the payload.

    Masking and unmasking are the same operation.
    """
    view = np.frombuffer(buffer, dtype=np.uint8)
    if not len(view):
        return
    shift = offset % 4
    key = np.frombuffer(mask_key[shift:] + mask_key[:shift], dtype=np.uint8)
    words = len(view) // 4
    if words:
        body = view[: words * 4].view(np.uint32)
        np.bitwise_xor(body, key.view(np.uint32)[0], out=body)
    tail = view[words * 4 :]
    if len(tail):
        np.bitwise_xor(tail, key[: len(tail)], out=tail)


def masked_copy(
    dst: memoryview, src: bytes | bytearray | memoryview, mask_key: bytes, *, offset: int = 0
) -> None:
    """Write ``src`` XOR the mask into ``dst`` (same length) in one pass, as if ``src`` started
    ``offset`` bytes into the payload; ``src`` is left untouched."""
    source = np.frombuffer(src, dtype=np.uint8)
    target = np.frombuffer(dst, dtype=np.uint8)
    if not len(source):
        return
    shift = offset % 4
    key = np.frombuffer(mask_key[shift:] + mask_key[:shift], dtype=np.uint8)
    words = len(source) // 4
    if words:
        np.bitwise_xor(
            source[: words * 4].view(np.uint32),
            key.view(np.uint32)[0],
            out=target[: words * 4].view(np.uint32),
        )
    tail = len(source) - words * 4
    if tail:
        np.bitwise_xor(source[words * 4 :], key[:tail], out=target[words * 4 :])


def close_payload(code: CloseCode | int, reason: str = "") -> bytes:
    """The payload of a close frame: a 2-byte code and a UTF-8 reason, cut to fit 125 bytes."""
    return struct.pack("!H", int(code)) + reason.encode()[: MAX_CONTROL_PAYLOAD - 2]


def parse_close(payload: bytes) -> tuple[int, str]:
    """``(code, reason)`` of a close frame; ``(1005, "")`` when it carries none (RFC 6455 §7.1.5).

    Raises ``ProtocolError`` for a 1-byte payload or a code a peer may not send, and
    ``InvalidPayload`` (a ``ProtocolError``) for a reason that is not UTF-8.
    """
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    if not valid_close_code(code):
        raise ProtocolError(f"close frame with code {code}, which a peer may not send")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise InvalidPayload("close frame whose reason is not UTF-8") from None


class InvalidPayload(ProtocolError):
    """Data that is not what its frame says (RFC 6455 §7.4.1 code 1007)."""
