"""Peers authenticate before any message is decoded, and every later frame is tagged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from butterfly.errors import AuthenticationError, NetworkError
from butterfly.protocol import PROTOCOL_VERSION, Handshake, Heartbeat, Hello, encode
from butterfly.protocol.auth import Authenticator
from butterfly.transport import Connection, MemoryNetwork, Peer, open_peer

SECRET = b"a shared secret of the cluster"


def _hello(node: str, role: str) -> Hello:
    return Hello(version=PROTOCOL_VERSION, node_id=node, role=role)


@asynccontextmanager
async def serving(
    net: MemoryNetwork, handler: Callable[[Connection], object]
) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(net.serve, "mem://server", handler)
        yield address
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(net: MemoryNetwork, secret: bytes | None) -> AsyncIterator[Peer]:
    async with (
        net.connect("mem://server") as conn,
        open_peer(
            conn, max_message_size=1 << 20, send_queue_size=4, secret=secret, dialer=True
        ) as peer,
    ):
        yield peer


def worker(secret: bytes | None, outcome: dict[str, object]) -> Callable[[Connection], object]:
    """A server peer that handshakes, then echoes one Heartbeat; records how it ended."""

    async def handler(conn: Connection) -> None:
        async with open_peer(
            conn, max_message_size=1 << 20, send_queue_size=4, secret=secret
        ) as peer:
            try:
                await peer.handshake(
                    _hello("w", "worker"), Handshake(_hello("w", "worker")), timeout=5
                )
                message = await peer.receive()
                outcome["received"] = message
                await peer.send(message)
                await trio.sleep_forever()
            except NetworkError as exc:
                outcome["error"] = exc

    return handler


async def _handshake(peer: Peer) -> Hello:
    return await peer.handshake(
        _hello("c", "coordinator"), Handshake(_hello("c", "coordinator")), timeout=5
    )


async def test_peers_with_the_same_secret_authenticate_and_exchange_messages() -> None:
    net, outcome = MemoryNetwork(), {}
    async with serving(net, worker(SECRET, outcome)), client(net, SECRET) as peer:
        assert (await _handshake(peer)).node_id == "w"
        assert peer.authenticated
        await peer.send(Heartbeat(7))
        assert await peer.receive() == Heartbeat(7)


async def test_a_client_without_the_secret_is_told_the_worker_needs_one() -> None:
    net, outcome = MemoryNetwork(), {}
    async with serving(net, worker(SECRET, outcome)), client(net, None) as peer:
        with pytest.raises(
            AuthenticationError, match="authenticates with a shared secret and this side has none"
        ):
            await _handshake(peer)
        await trio.testing.wait_all_tasks_blocked()
    assert "did not offer authentication" in str(outcome["error"])
    assert "received" not in outcome


async def test_a_client_with_a_secret_refuses_a_worker_without_one() -> None:
    net, outcome = MemoryNetwork(), {}
    async with serving(net, worker(None, outcome)), client(net, SECRET) as peer:
        with pytest.raises(AuthenticationError, match="did not offer authentication"):
            await _handshake(peer)
        await trio.testing.wait_all_tasks_blocked()
    assert "authenticates with a shared secret and this side has none" in str(outcome["error"])


async def test_different_secrets_are_refused_on_both_sides() -> None:
    net, outcome = MemoryNetwork(), {}
    async with (
        serving(net, worker(b"the worker's secret, 16+ bytes", outcome)),
        client(net, SECRET) as peer,
    ):
        with pytest.raises(AuthenticationError, match="did not prove the shared secret"):
            await _handshake(peer)
        await trio.testing.wait_all_tasks_blocked()
    assert "did not prove the shared secret" in str(outcome["error"])
    assert "received" not in outcome


async def test_a_peer_that_stalls_after_its_offer_times_out_the_handshake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()

    async def stalls(conn: Connection) -> None:
        await conn.send(Authenticator(SECRET, dialer=False, peer="c").offer())
        await trio.sleep_forever()

    async with serving(net, stalls), client(net, SECRET) as peer:
        with pytest.raises(NetworkError, match="did not complete the handshake within 5 s"):
            await _handshake(peer)


async def test_an_untagged_message_after_the_handshake_closes_the_connection() -> None:
    net = MemoryNetwork()

    async def forges(conn: Connection) -> None:
        auth = Authenticator(SECRET, dialer=False, peer="c")
        await conn.send(auth.offer())
        await conn.send(auth.proof(await conn.receive()))
        seal = auth.check_proof(await conn.receive())
        hello = encode(_hello("w", "worker"))
        await conn.send(hello, seal.tag((hello,)))
        await conn.receive()  # the client's Hello
        await conn.send(hello)  # no tag: a frame injected into the stream
        await trio.sleep_forever()

    async with serving(net, forges), client(net, SECRET) as peer:
        await _handshake(peer)
        with pytest.raises(
            AuthenticationError, match=r"frame 1 from mem://server failed its integrity check"
        ):
            await peer.receive()
        with pytest.raises(NetworkError):
            await peer.send(Heartbeat(2))
