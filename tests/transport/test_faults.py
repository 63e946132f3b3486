"""The seeded fault transport: each fault kind, partitions, and replay of a seed."""

from __future__ import annotations

import pytest
import trio

from butterfly.errors import ConfigError, NetworkError
from butterfly.transport.base import Connection
from butterfly.transport.faults import Fault, FaultyNetwork


async def _exchange(net: FaultyNetwork, frames: list[bytes], *, wait: float = 1.0) -> list[bytes]:
    """Send ``frames`` from a client named "a" to a server "b"; what "b" received."""
    received: list[bytes] = []

    async def handler(conn: Connection) -> None:
        with trio.move_on_after(wait):
            while True:
                received.append(bytes(await conn.receive()))

    async with trio.open_nursery() as nursery:
        await nursery.start(net.node("b").serve, "b", handler)
        async with net.node("a").connect("b") as conn:
            for frame in frames:
                await conn.send(frame)
            await trio.sleep(wait + 0.1)
        nursery.cancel_scope.cancel()
    return received


FRAMES = [bytes([i]) for i in range(6)]


async def test_drop_loses_every_frame_and_records_each(autojump_clock: trio.abc.Clock) -> None:
    net = FaultyNetwork(seed=1, drop=1.0)
    assert await _exchange(net, FRAMES) == []
    assert net.faults == [Fault("a->b#0", i, "drop") for i in range(6)]


async def test_duplicate_delivers_every_frame_twice(autojump_clock: trio.abc.Clock) -> None:
    net = FaultyNetwork(seed=1, duplicate=1.0)
    assert await _exchange(net, FRAMES[:3]) == [
        b"\x00",
        b"\x00",
        b"\x01",
        b"\x01",
        b"\x02",
        b"\x02",
    ]
    assert net.counts() == {"duplicate": 3}


async def test_reorder_lets_the_next_frame_overtake(autojump_clock: trio.abc.Clock) -> None:
    net = FaultyNetwork(seed=1, reorder=1.0)
    # frame 0 is held, frame 1 overtakes it (and is not faulted); then 2 and 3 likewise
    assert await _exchange(net, FRAMES[:4]) == [b"\x01", b"\x00", b"\x03", b"\x02"]
    assert net.faults == [Fault("a->b#0", 0, "reorder"), Fault("a->b#0", 1, "reorder")]


async def test_a_held_frame_is_delivered_when_no_other_follows(
    autojump_clock: trio.abc.Clock,
) -> None:
    net = FaultyNetwork(seed=1, reorder=1.0, max_delay_s=0.2)
    assert await _exchange(net, FRAMES[:1]) == [b"\x00"]


async def test_disabled_network_injects_nothing(autojump_clock: trio.abc.Clock) -> None:
    net = FaultyNetwork(seed=1, drop=1.0)
    net.enabled = False
    assert await _exchange(net, FRAMES) == FRAMES
    assert net.faults == []


async def test_a_partition_silences_links_and_refuses_connections(
    autojump_clock: trio.abc.Clock,
) -> None:
    net = FaultyNetwork(seed=1)
    net.partition({"a"}, {"b"})
    assert net.cut("a", "b") and net.cut("b", "a") and not net.cut("a", "c")
    async with trio.open_nursery() as nursery:
        await nursery.start(net.node("b").serve, "b", _ignore)
        with pytest.raises(NetworkError, match="b is unreachable from a"):
            async with net.node("a").connect("b"):
                pass
        nursery.cancel_scope.cancel()
    net.heal()
    assert await _exchange(net, FRAMES[:2]) == FRAMES[:2]


async def test_a_partition_drops_frames_on_an_open_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    net = FaultyNetwork(seed=1)
    received: list[bytes] = []

    async def handler(conn: Connection) -> None:
        with trio.move_on_after(1):
            while True:
                received.append(bytes(await conn.receive()))

    async with trio.open_nursery() as nursery:
        await nursery.start(net.node("b").serve, "b", handler)
        async with net.node("a").connect("b") as conn:
            await conn.send(b"before")
            await trio.sleep(0.1)
            net.partition({"a"}, {"b"})
            await conn.send(b"during")
            await trio.sleep(1.1)
        nursery.cancel_scope.cancel()
    assert received == [b"before"]
    assert net.counts() == {"partition": 1}


async def test_the_same_seed_injects_the_same_faults(autojump_clock: trio.abc.Clock) -> None:
    frames = [bytes([i]) for i in range(200)]
    runs = []
    for seed in (5, 5, 6):
        net = FaultyNetwork(seed=seed, drop=0.1, duplicate=0.1, reorder=0.1, delay=0.1)
        runs.append((await _exchange(net, frames, wait=5), net.faults))
    assert runs[0] == runs[1]
    assert runs[0][1] != runs[2][1]
    assert {f.kind for f in runs[0][1]} == {"drop", "duplicate", "reorder", "delay"}


def test_probabilities_outside_0_1_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"drop probability 1\.5 is not in \[0, 1\]"):
        FaultyNetwork(seed=0, drop=1.5)
    with pytest.raises(ConfigError, match=r"add up to 1\.2; at most 1"):
        FaultyNetwork(seed=0, drop=0.6, duplicate=0.6)


async def _ignore(conn: Connection) -> None:
    await trio.sleep_forever()
