"""Our websocket adapter speaks standard RFC 6455: checked against trio-websocket (wsproto)
and against the websockets library, two independent implementations."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from functools import partial

import pytest
import trio
import trio_websocket
import websockets.sync.client
import websockets.sync.server

from butterfly.config import NetworkConfig
from butterfly.errors import NetworkError, ProtocolError
from butterfly.transport import Connection, WebsocketTransport

PAYLOADS = [b"", b"x", bytes(range(256)) * 300, b"y" * (3 << 20)]


async def echo(conn: Connection) -> None:
    while True:
        try:
            await conn.send(bytes(await conn.receive()))
        except NetworkError:
            return


@pytest.fixture
async def our_server(nursery: trio.Nursery) -> str:
    transport = WebsocketTransport(NetworkConfig(max_message_size=8 << 20))
    return await nursery.start(transport.serve, "ws://127.0.0.1:0", echo)


async def test_trio_websocket_client_talks_to_our_server(our_server: str) -> None:
    async with trio_websocket.open_websocket_url(our_server, max_message_size=8 << 20) as ws:
        for payload in PAYLOADS:
            await ws.send_message(payload)
            assert await ws.get_message() == payload


async def test_our_server_answers_a_ping(our_server: str) -> None:
    async with trio_websocket.open_websocket_url(our_server) as ws:
        with trio.fail_after(5):
            await ws.ping(b"are you there")


async def test_our_server_closes_with_1009_on_a_message_above_the_limit(
    nursery: trio.Nursery,
) -> None:
    transport = WebsocketTransport(NetworkConfig(max_message_size=1024))
    address = await nursery.start(transport.serve, "ws://127.0.0.1:0", echo)
    async with trio_websocket.open_websocket_url(address) as ws:
        await ws.send_message(b"z" * 2048)
        with pytest.raises(trio_websocket.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1009


async def test_our_client_talks_to_a_trio_websocket_server(nursery: trio.Nursery) -> None:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed:
            pass

    server = await nursery.start(
        lambda task_status: trio_websocket.serve_websocket(
            handler, "127.0.0.1", 0, None, max_message_size=8 << 20, task_status=task_status
        )
    )
    transport = WebsocketTransport()
    async with transport.connect(f"ws://127.0.0.1:{server.port}") as conn:
        for payload in PAYLOADS:
            await conn.send(payload)
            assert await conn.receive() == payload


async def test_text_frame_is_a_protocol_error(nursery: trio.Nursery) -> None:
    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("hello")
        await trio.sleep(5)

    server = await nursery.start(
        lambda task_status: trio_websocket.serve_websocket(
            handler, "127.0.0.1", 0, None, task_status=task_status
        )
    )
    async with WebsocketTransport().connect(f"ws://127.0.0.1:{server.port}") as conn:
        with pytest.raises(ProtocolError, match="text frame; only binary frames are accepted"):
            await conn.receive()


async def test_plain_http_request_is_refused_with_400(our_server: str) -> None:
    host, port = our_server.removeprefix("ws://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await stream.receive_some(1024)
    assert answer.startswith(b"HTTP/1.1 400 ")
    await stream.aclose()


async def test_server_that_is_not_websocket_is_a_network_error(nursery: trio.Nursery) -> None:
    async def http_only(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    listeners = await nursery.start(partial(trio.serve_tcp, http_only, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(NetworkError, match=r"websocket upgrade refused .* \(answer 404\)"):
        async with WebsocketTransport().connect(f"ws://127.0.0.1:{port}"):
            pass


async def _upgraded(address: str, request: bytes | None = None) -> tuple[trio.SocketStream, bytes]:
    """A raw stream after a websocket upgrade (or after ``request``), and the answer."""
    host, port = address.removeprefix("ws://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(
        request
        or (
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
    )
    return stream, await stream.receive_some(1024)


async def _close_code(stream: trio.SocketStream) -> int:
    """The code of the close frame the server sends next (after its 2-byte header)."""
    with trio.fail_after(5):
        data = b""
        while len(data) < 4:
            chunk = await stream.receive_some(1024)
            assert chunk, "the server closed without a close frame"
            data += chunk
    assert data[0] == 0x88  # FIN + CLOSE
    return int.from_bytes(data[2:4], "big")


async def test_an_unmasked_client_frame_is_refused_with_1002_before_its_payload_is_read(
    our_server: str,
) -> None:
    stream, answer = await _upgraded(our_server)
    assert answer.startswith(b"HTTP/1.1 101 ")
    # A header announcing 4 MiB, unmasked (a client must mask), and no payload at all.
    await stream.send_all(bytes([0x82, 127]) + (4 << 20).to_bytes(8, "big"))
    assert await _close_code(stream) == 1002
    await stream.aclose()


@pytest.mark.parametrize("code", [999, 1006, 65535])
async def test_a_close_code_a_peer_may_not_send_is_answered_with_1002(
    our_server: str, code: int
) -> None:
    stream, _ = await _upgraded(our_server)
    key = b"\x01\x02\x03\x04"
    payload = bytes(b ^ key[i % 4] for i, b in enumerate(code.to_bytes(2, "big")))
    await stream.send_all(bytes([0x88, 0x80 | 2]) + key + payload)
    assert await _close_code(stream) == 1002
    await stream.aclose()


async def test_a_close_reason_that_is_not_utf8_is_answered_with_1007(our_server: str) -> None:
    stream, _ = await _upgraded(our_server)
    key = b"\x00\x00\x00\x00"
    await stream.send_all(bytes([0x88, 0x80 | 4]) + key + b"\x03\xe8\xff\xfe")
    assert await _close_code(stream) == 1007
    await stream.aclose()


async def test_a_frame_with_reserved_bits_is_answered_with_1002(our_server: str) -> None:
    stream, _ = await _upgraded(our_server)
    await stream.send_all(bytes([0xC2, 0x80 | 1]) + b"\x00\x00\x00\x00x")  # RSV1 set
    assert await _close_code(stream) == 1002
    await stream.aclose()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: not base64!!\r\nSec-WebSocket-Version: 13\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    ],
    ids=["key-not-base64", "http-1.0"],
)
async def test_a_malformed_upgrade_is_refused_with_400(
    our_server: str, request_bytes: bytes
) -> None:
    stream, answer = await _upgraded(our_server, request_bytes)
    assert answer.startswith(b"HTTP/1.1 400 ")
    await stream.aclose()


# -- the websockets library: a second, independent implementation --------------------------


@contextlib.contextmanager
def our_echo_server_in_a_thread() -> Iterator[str]:
    """Our server in a trio run of its own thread, for clients that block."""
    ready: queue.Queue[tuple[str, trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def main() -> None:
        transport = WebsocketTransport(NetworkConfig(max_message_size=8 << 20))
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                address = await nursery.start(transport.serve, "ws://127.0.0.1:0", echo)
                ready.put((address, trio.lowlevel.current_trio_token(), scope))

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    address, token, scope = ready.get(timeout=10)
    try:
        yield address
    finally:
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        thread.join(10)


def test_a_websockets_client_talks_to_our_server_without_compression() -> None:
    with (
        our_echo_server_in_a_thread() as address,
        websockets.sync.client.connect(address, max_size=8 << 20) as ws,
    ):
        # websockets offers permessage-deflate; our server does not take it.
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        for payload in PAYLOADS:
            ws.send(payload)
            assert ws.recv(timeout=10) == payload


def test_our_client_talks_to_a_websockets_server() -> None:
    def echo_handler(ws: websockets.sync.server.ServerConnection) -> None:
        for message in ws:
            ws.send(message)

    with websockets.sync.server.serve(echo_handler, "127.0.0.1", 0, max_size=8 << 20) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]

        async def talk() -> list[bytes]:
            transport = WebsocketTransport(NetworkConfig(max_message_size=8 << 20))
            answers = []
            async with transport.connect(f"ws://127.0.0.1:{port}") as conn:
                for payload in PAYLOADS:
                    await conn.send(payload)
                    answers.append(bytes(await conn.receive()))
            return answers

        try:
            assert trio.run(talk) == PAYLOADS
        finally:
            server.shutdown()
