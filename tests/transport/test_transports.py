"""Both transport adapters behave alike: frames, closing, limits, handshake and backpressure."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trio_websocket

from butterfly.config import NetworkConfig
from butterfly.errors import AuthenticationError, NetworkError, ProtocolError
from butterfly.protocol import PROTOCOL_VERSION, Handshake, Heartbeat, Hello, encode
from butterfly.protocol.auth import FrameSeal
from butterfly.transport import (
    Connection,
    MemoryNetwork,
    Transport,
    WebsocketTransport,
    dial,
    open_peer,
    parse_address,
)
from butterfly.transport.retry import backoff_delays

ADDRESSES = {"memory": "mem://server", "websocket": "ws://127.0.0.1:0"}


def make_transport(kind: str, max_message_size: int = 16 << 20) -> Transport:
    if kind == "memory":
        return MemoryNetwork(max_message_size=max_message_size)
    return WebsocketTransport(NetworkConfig(max_message_size=max_message_size))


@asynccontextmanager
async def serving(
    transport: Transport, kind: str, handler: Callable[[Connection], object]
) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.serve, ADDRESSES[kind], handler)
        yield address
        nursery.cancel_scope.cancel()


async def echo(conn: Connection) -> None:
    while True:
        try:
            frame = await conn.receive()
        except NetworkError:
            return
        await conn.send(frame)


@pytest.mark.parametrize("kind", ["memory", "websocket"])
async def test_frames_round_trip_including_ones_above_the_library_default_limit(kind: str) -> None:
    transport = make_transport(kind)
    async with serving(transport, kind, echo) as address, transport.connect(address) as conn:
        for size in (0, 1, 4096, 5 << 20):
            payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
            await conn.send(payload)
            assert await conn.receive() == payload


@pytest.mark.parametrize("kind", ["memory", "websocket"])
async def test_receive_after_peer_closes_raises_network_error(kind: str) -> None:
    async def close_at_once(conn: Connection) -> None:
        await conn.aclose()

    transport = make_transport(kind)
    async with (
        serving(transport, kind, close_at_once) as address,
        transport.connect(address) as conn,
    ):
        with pytest.raises(NetworkError, match="closed"):
            await conn.receive()


@pytest.mark.parametrize("kind", ["memory", "websocket"])
async def test_frame_above_max_message_size_breaks_the_connection(kind: str) -> None:
    transport = make_transport(kind, max_message_size=1024)
    async with serving(transport, kind, echo) as address, transport.connect(address) as conn:
        with pytest.raises(NetworkError):
            await conn.send(b"x" * 4096)
            await conn.receive()


@pytest.mark.parametrize("kind", ["memory", "websocket"])
async def test_connecting_to_nothing_raises_network_error_naming_the_address(kind: str) -> None:
    transport = make_transport(kind)
    address = "mem://nobody" if kind == "memory" else "ws://127.0.0.1:1"
    with pytest.raises(NetworkError, match=address.split("//")[1]):
        async with transport.connect(address):
            pass


async def test_websocket_server_survives_a_bad_client() -> None:
    async def strict(conn: Connection) -> None:
        raise ProtocolError("bad client")

    transport = WebsocketTransport()
    async with serving(transport, "websocket", strict) as address:
        for _ in range(2):
            async with trio_websocket.open_websocket_url(address) as ws:
                with pytest.raises(trio_websocket.ConnectionClosed):
                    await ws.get_message()


def test_parse_address_accepts_ws_urls_and_host_port() -> None:
    assert parse_address("ws://10.0.0.5:7070") == ("10.0.0.5", 7070)
    assert parse_address("127.0.0.1:80") == ("127.0.0.1", 80)


@pytest.mark.parametrize("bad", ["http://h:1", "ws://host", "ws://:80", "ws://h:notaport"])
def test_parse_address_rejects_what_is_not_ws_host_port(bad: str) -> None:
    with pytest.raises(NetworkError, match="expected ws://HOST:PORT"):
        parse_address(bad)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert backoff_delays(6, 0.1, 1.0) == [0.1, 0.2, 0.4, 0.8, 1.0]


async def test_dial_retries_until_the_listener_appears(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()

    async def late_server(task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep(0.25)
        await net.serve("mem://late", echo)

    async with trio.open_nursery() as nursery:
        await nursery.start(late_server)
        start = trio.current_time()
        async with dial(net, "mem://late", attempts=5, initial_delay=0.1, max_delay=1) as conn:
            await conn.send(b"hi")
            assert await conn.receive() == b"hi"
        # Tried at 0 and 0.1 (nothing there), then at 0.3: the listener is up since 0.25.
        assert trio.current_time() - start == pytest.approx(0.3)
        nursery.cancel_scope.cancel()


async def test_dial_gives_up_after_the_attempts_naming_the_address(
    autojump_clock: trio.testing.MockClock,
) -> None:
    with pytest.raises(NetworkError, match="could not reach mem://gone after 3 attempt"):
        async with dial(MemoryNetwork(), "mem://gone", attempts=3, initial_delay=0.1, max_delay=1):
            pass


def _hello(node: str, role: str) -> Hello:
    return Hello(version=PROTOCOL_VERSION, node_id=node, role=role)


async def test_peer_handshake_then_typed_messages() -> None:
    net = MemoryNetwork()

    async def server(conn: Connection) -> None:
        async with open_peer(conn, max_message_size=1 << 20, send_queue_size=4) as peer:
            await peer.handshake(_hello("s", "worker"), Handshake(_hello("s", "worker")), timeout=5)
            message = await peer.receive()
            assert isinstance(message, Heartbeat)
            await peer.send(Heartbeat(message.seq + 1))
            await trio.sleep_forever()

    async with (
        serving(net, "memory", server) as address,
        net.connect(address) as conn,
        open_peer(conn, max_message_size=1 << 20, send_queue_size=4) as peer,
    ):
        hello = await peer.handshake(
            _hello("c", "coordinator"), Handshake(_hello("c", "coordinator")), timeout=5
        )
        assert hello.node_id == "s"
        await peer.send(Heartbeat(1))
        assert await peer.receive() == Heartbeat(2)


async def test_peer_senders_wait_when_the_peer_stops_reading() -> None:
    """Memory stays bounded: 1 frame in the connection's buffer, 1 being written directly,
    1 held by the draining task, 2 in the send queue; every other sender waits."""
    net = MemoryNetwork(buffer=1)
    stalled = trio.Event()

    async def never_reads(conn: Connection) -> None:
        await stalled.wait()

    completed = 0
    async with (
        serving(net, "memory", never_reads) as address,
        net.connect(address) as conn,
        open_peer(conn, max_message_size=1 << 20, send_queue_size=2) as peer,
    ):

        async def send_one(i: int) -> None:
            nonlocal completed
            await peer.send(Heartbeat(i))
            completed += 1

        with trio.move_on_after(0.5):
            async with trio.open_nursery() as senders:
                for i in range(10):
                    senders.start_soon(send_one, i)
        assert completed == 4
        stalled.set()


async def test_peer_refuses_to_send_a_message_above_the_limit() -> None:
    net = MemoryNetwork()
    async with (
        serving(net, "memory", echo) as address,
        net.connect(address) as conn,
        open_peer(conn, max_message_size=10, send_queue_size=2) as peer,
    ):
        with pytest.raises(ProtocolError, match="exceeds max_message_size 10"):
            await peer.send(_hello("c", "coordinator"))


async def test_peer_handshake_times_out_when_the_other_side_is_silent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()

    async def silent(conn: Connection) -> None:
        await trio.sleep_forever()

    async with (
        serving(net, "memory", silent) as address,
        net.connect(address) as conn,
        open_peer(conn, max_message_size=1 << 20, send_queue_size=2) as peer,
    ):
        with pytest.raises(NetworkError, match="did not complete the handshake within 3 s"):
            await peer.handshake(
                _hello("c", "coordinator"), Handshake(_hello("c", "coordinator")), timeout=3
            )


async def test_a_second_hello_after_the_handshake_is_a_protocol_error() -> None:
    net = MemoryNetwork()

    async def hello_twice(conn: Connection) -> None:
        await conn.send(encode(_hello("s", "worker")))
        await conn.receive()
        await conn.send(encode(_hello("impostor", "worker")))
        await trio.sleep_forever()

    async with (
        serving(net, "memory", hello_twice) as address,
        net.connect(address) as conn,
        open_peer(conn, max_message_size=1 << 20, send_queue_size=2) as peer,
    ):
        await peer.handshake(
            _hello("c", "coordinator"), Handshake(_hello("c", "coordinator")), timeout=5
        )
        with pytest.raises(ProtocolError, match="sent a second Hello after the handshake"):
            await peer.receive()


def _seals() -> tuple[FrameSeal, FrameSeal]:
    """The two ends of one authenticated connection: (client's, server's)."""
    up, down = secrets.token_bytes(32), secrets.token_bytes(32)
    return (
        FrameSeal(send_key=up, receive_key=down, peer="server"),
        FrameSeal(send_key=down, receive_key=up, peer="client"),
    )


SEALED_SIZES = (0, 1, 4096, 70_000, 5 << 20)  # one piece; joined; streamed in chunks


@pytest.mark.parametrize("kind", ["memory", "websocket"])
async def test_sealed_frames_of_every_size_round_trip_in_both_directions(kind: str) -> None:
    client_seal, server_seal = _seals()

    async def sealed_echo(conn: Connection) -> None:
        while True:
            try:
                frame = await conn.receive(check=server_seal.incoming())
            except NetworkError:
                return
            await conn.send(b"head", frame, mac=server_seal.outgoing())

    transport = make_transport(kind)
    async with serving(transport, kind, sealed_echo) as address, transport.connect(address) as conn:
        for size in SEALED_SIZES:
            payload = secrets.token_bytes(size)
            await conn.send(payload[:7], payload[7:], mac=client_seal.outgoing())
            assert bytes(await conn.receive(check=client_seal.incoming())) == b"head" + payload


@pytest.mark.parametrize("size", SEALED_SIZES)
@pytest.mark.parametrize("kind", ["memory", "websocket"])
async def test_a_frame_tagged_with_another_key_is_refused_whatever_its_size(
    kind: str, size: int
) -> None:
    client_seal, _ = _seals()
    _, stranger = _seals()

    async def forge(conn: Connection) -> None:
        await conn.send(bytes(size), mac=stranger.outgoing())
        await trio.sleep_forever()

    transport = make_transport(kind)
    async with serving(transport, kind, forge) as address, transport.connect(address) as conn:
        with pytest.raises(AuthenticationError, match="frame 0 from server failed its integrity"):
            await conn.receive(check=client_seal.incoming())


@pytest.mark.parametrize("kind", ["memory", "websocket"])
async def test_a_receive_cancelled_before_its_frame_arrives_does_not_use_up_a_frame_number(
    kind: str,
) -> None:
    client_seal, server_seal = _seals()
    go = trio.Event()

    async def late(conn: Connection) -> None:
        await go.wait()
        await conn.send(bytes(100_000), mac=server_seal.outgoing())
        await trio.sleep_forever()

    transport = make_transport(kind)
    async with serving(transport, kind, late) as address, transport.connect(address) as conn:
        with trio.move_on_after(0.05):
            await conn.receive(check=client_seal.incoming())
        go.set()
        assert bytes(await conn.receive(check=client_seal.incoming())) == bytes(100_000)
