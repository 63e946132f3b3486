"""Our RFC 6455 framer against wsproto (the sans-IO reference under trio-websocket).

The same byte stream — valid frames, fragmented messages, control frames, close codes,
masked and unmasked, and random mutations of all of these — is fed to our server-side
:class:`WebsocketConnection` (over a real socket pair) and to ``wsproto``'s server
connection. Both must see the same binary messages and pings and end the same way: the
same close code (the peer's, or the one sent for a protocol error), or both still waiting
for more bytes. Where we deviate on purpose it is spelled out: text frames are refused
(1003; Butterfly speaks binary only), and a frame is judged from its first bytes (wsproto
waits for its whole header and a first byte of its payload).
"""

from __future__ import annotations

import os
import re
import struct

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage

from butterfly.errors import NetworkError, ProtocolError
from butterfly.transport.rfc6455 import Opcode, encode_header, mask, parse_header
from butterfly.transport.websocket import WebsocketConnection

Outcome = tuple[list[bytes], list[bytes], tuple[str, int]]
EXAMPLES = int(os.environ.get("BUTTERFLY_FUZZ_EXAMPLES", "300"))


def wsproto_outcome(data: bytes) -> Outcome:
    conn = WsprotoConnection(ConnectionType.SERVER)
    conn.receive_data(data)
    messages: list[bytes] = []
    pings: list[bytes] = []
    partial = bytearray()
    for event in conn.events():
        if isinstance(event, BytesMessage):
            partial += event.data
            if event.message_finished:
                messages.append(bytes(partial))
                partial.clear()
        elif isinstance(event, Ping):
            pings.append(bytes(event.payload))
        elif isinstance(event, TextMessage):
            return messages, pings, ("close", 1003)  # ours refuses text: see the docstring
        elif isinstance(event, CloseConnection):
            return messages, pings, ("close", int(event.code))
    return messages, pings, ("incomplete", 0)


async def _ours(data: bytes) -> Outcome:
    a, b = trio.socket.socketpair()
    stream = trio.SocketStream(a)
    conn = WebsocketConnection(
        stream, client=False, remote="fuzz", max_message_size=16 << 20, read_size=1 << 20
    )
    messages: list[bytes] = []
    written = bytearray()
    end: tuple[str, int] = ("incomplete", 0)

    async def feed() -> None:
        view = memoryview(data)
        while view:
            view = view[await b.send(view[: 1 << 16]) :]
        b.shutdown(trio.socket.SHUT_WR)

    async def collect() -> None:
        while chunk := await b.recv(1 << 16):
            written.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        nursery.start_soon(collect)
        with trio.fail_after(10):
            try:
                while True:
                    messages.append(bytes(await conn.receive()))
            except ProtocolError:
                end = ("error", 0)  # the code is in the close frame it sent
            except NetworkError as exc:
                peer = re.search(r"peer closed with code (\d+)", str(exc))
                end = ("close", int(peer[1])) if peer else ("incomplete", 0)
        await stream.aclose()  # without a close frame: the collector sees end of stream
    b.close()
    if end[0] == "error":
        end = ("close", _close_code_sent(bytes(written)))
    return messages, _pongs(bytes(written)), end


def _frames_sent(data: bytes) -> list[tuple[int, bytes]]:
    frames, at = [], 0
    while (header := parse_header(data[at:])) is not None:
        frames.append(
            (int(header.opcode), data[at + header.size : at + header.size + header.length])
        )
        at += header.size + header.length
    return frames


def _pongs(data: bytes) -> list[bytes]:
    return [payload for opcode, payload in _frames_sent(data) if opcode == 0xA]


def _close_code_sent(data: bytes) -> int:
    closes = [payload for opcode, payload in _frames_sent(data) if opcode == 0x8]
    assert closes, "a protocol error must be answered with a close frame"
    return int(struct.unpack("!H", closes[0][:2])[0])


def ours_outcome(data: bytes) -> Outcome:
    return trio.run(_ours, data)


# -- generated streams --------------------------------------------------------------------------


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, key: bytes | None = b"\x11\x22\x33\x44"
) -> bytes:
    """One frame as a client sends it (masked with ``key``; ``None``: unmasked, a violation)."""
    body = bytearray(payload)
    if key is not None:
        mask(body, key)
    return encode_header(Opcode(opcode), len(payload), fin=fin, mask_key=key) + bytes(body)


close_codes = st.sampled_from(
    [
        1000,
        1001,
        1002,
        1003,
        1004,
        1005,
        1006,
        1007,
        1011,
        1012,
        1014,
        1015,
        2000,
        2999,
        3000,
        4000,
        4999,
        5000,
        65535,
    ]
)
payloads = st.binary(max_size=300) | st.binary(min_size=65530, max_size=70000)


@st.composite
def one_frame(draw: st.DrawFn) -> bytes:
    kind = draw(
        st.sampled_from(
            ["binary", "fragmented", "ping", "pong", "close", "close-empty", "close-reason", "raw"]
        )
    )
    key = draw(st.binary(min_size=4, max_size=4))
    if kind == "binary":
        return frame(0x2, draw(payloads), key=key)
    if kind == "fragmented":
        parts = draw(st.lists(st.binary(max_size=200), min_size=2, max_size=4))
        out = frame(0x2, parts[0], fin=False, key=key)
        for i, part in enumerate(parts[1:], 1):
            if draw(st.booleans()):
                out += frame(0x9, draw(st.binary(max_size=20)), key=key)  # a ping between fragments
            out += frame(0x0, part, fin=i == len(parts) - 1, key=key)
        return out
    if kind in ("ping", "pong"):
        return frame(0x9 if kind == "ping" else 0xA, draw(st.binary(max_size=125)), key=key)
    if kind == "close":
        return frame(0x8, struct.pack("!H", draw(close_codes)), key=key)
    if kind == "close-empty":
        return frame(0x8, b"", key=key)
    if kind == "close-reason":
        reason = draw(st.binary(max_size=20) | st.text(max_size=20).map(str.encode))
        return frame(0x8, struct.pack("!H", draw(close_codes)) + reason[:123], key=key)
    return draw(st.binary(min_size=1, max_size=40))  # arbitrary bytes


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    data = bytearray(b"".join(draw(st.lists(one_frame(), min_size=1, max_size=5))))
    for _ in range(draw(st.integers(0, 3))):  # mutations
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "truncate", "insert", "unmask"]))
        if action == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "truncate":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            data[min(at, len(data) - 1) if len(data) < 2 else 1] &= 0x7F
    return bytes(data)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(streams())
def test_our_framer_and_wsproto_see_the_same_stream_the_same_way(data: bytes) -> None:
    ours, theirs = ours_outcome(data), wsproto_outcome(data)
    padding = 0
    while ours[2][0] == "close" and theirs[2][0] == "incomplete" and padding < 16:
        # We judge a frame by its first bytes; wsproto once its whole header and a byte
        # of its payload have arrived.
        padding += 1
        theirs = wsproto_outcome(data + b"\x00" * padding)
    if ours[2] == ("close", 1003) and theirs[2] == ("close", 1007):
        # A text frame: we refuse it as text (1003), wsproto as invalid UTF-8 text (1007).
        theirs = (theirs[0], theirs[1], ("close", 1003))
    assert ours == theirs


def test_a_masked_binary_message_then_a_close_is_seen_alike() -> None:
    data = frame(0x2, b"activation") + frame(0x8, struct.pack("!H", 1000))
    assert ours_outcome(data) == wsproto_outcome(data) == ([b"activation"], [], ("close", 1000))


def test_an_unmasked_client_frame_is_a_1002_for_both() -> None:
    data = frame(0x2, b"x", key=None)
    assert ours_outcome(data) == wsproto_outcome(data) == ([], [], ("close", 1002))
