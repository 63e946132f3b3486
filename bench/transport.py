"""Transport benchmark: Butterfly's websocket stack against a raw trio TCP stream.

What is measured, on loopback (127.0.0.1, ports chosen by the kernel), in one run:

1. **Throughput** of 4 MiB float32 activations through one hop, in MB/s (10^6 bytes of tensor
   payload per second; framing bytes are not counted):

   * Butterfly's own stack, exactly as a worker uses it: ``WebsocketTransport`` with the
     default ``NetworkConfig``, ``open_peer``, the Hello exchange, ``Activation`` messages
     carrying ``array_to_wire(array)``, and ``Peer.receive()`` + ``array_from_wire`` on the
     receiving side. Measured in the design direction (the side that *accepted* the
     connection sends: unmasked frames) and, for information, the opposite one (the
     dialling side sends: RFC 6455 makes it mask every frame, which wsproto does in Python).
   * A well-written raw TCP baseline: ``trio.serve_tcp`` / ``trio.open_tcp_stream``,
     8-byte length prefix, payload sent from a memoryview, received with ``recv_into`` a
     preallocated buffer in reads of at most 1 MiB (the same as
     ``NetworkConfig.receive_buffer_size``). Same direction as the design one.

   * The same stack with a shared secret (``websocket+MAC``: the authenticated handshake,
     then a 16-byte AES-GMAC tag on every frame), and with TLS on top (``wss+MAC``: a
     certificate for 127.0.0.1 from a throwaway trustme CA). With both ends in one thread
     the MAC cannot overlap the transfer, so this is its CPU cost; ``bench.wire``
     measures what it adds to a hop between two processes over a shaped link.

2. **Round-trip time** of a 4 KiB message (the dialling side sends, the accepting side
   echoes it back) over both stacks; the figure of one repetition is the median of its
   round trips, in microseconds.

Why: DESIGN.md ("Direction matters") routes bulk tensors on connections the sender
accepted because the other direction is several times slower. This script keeps that
claim and the cost of the websocket layer over plain TCP measured, with two targets:
websocket/raw throughput >= 0.5 and websocket/raw RTT <= 3.

Everything runs in one process and one ``trio.run``: sender and receiver share a
single thread, so each figure is the *total* CPU cost of both ends of a stack per byte
(or per round trip). That is the fairest comparison of two stacks; with the server in a
subprocess the two ends would overlap on two cores by different amounts for each stack
(pure Python framing overlaps, kernel copies barely do), and on a 2-core machine the
scheduler's noise would dominate the RTT. Repetitions are interleaved (one sample of
every scenario per round) so that machine drift affects all scenarios alike.

Run it as ``python -m bench.transport [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import attrs
import numpy as np
import trio

from butterfly.config import NetworkConfig
from butterfly.protocol import (
    PROTOCOL_VERSION,
    Activation,
    Handshake,
    Hello,
    array_from_wire,
    array_to_wire,
)
from butterfly.transport import Connection, Peer, WebsocketTransport, open_peer

MiB = 1 << 20
LOOPBACK = "127.0.0.1"
THROUGHPUT_TARGET = 0.5  # websocket/raw, at least
RTT_TARGET = 3.0  # websocket/raw, at most
MAC_TARGET = 0.05  # time added to a hop by the frame MACs (authenticated vs not), below
BENCH_SECRET = b"the benchmark's shared secret"


# -- settings and results ----------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Sizes and loop bounds of one run."""

    message_bytes: int = 4 * MiB
    messages_per_sample: int = 64
    rtt_bytes: int = 4096
    round_trips_per_sample: int = 2000
    repeats: int = 5
    # Untimed, once per scenario: lets the allocator settle on 4 MiB blocks and trio's
    # and the kernel's buffers grow before the first sample.
    warmup_messages: int = 8
    warmup_round_trips: int = 200

    @classmethod
    def quick(cls, repeats: int = 5) -> Settings:
        return cls(
            messages_per_sample=16,
            round_trips_per_sample=500,
            repeats=repeats,
            warmup_round_trips=100,
        )


@dataclass(frozen=True)
class Summary:
    """The samples of one scenario and their median, min and max."""

    name: str
    unit: str
    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "median": self.median,
            "min": min(self.samples),
            "max": max(self.samples),
            "samples": self.samples,
        }


# -- one interface over both stacks ------------------------------------------------------


class Channel(Protocol):
    """One end of a connection that moves float32 arrays."""

    async def send_array(self, array: np.ndarray) -> None: ...

    async def receive_array(self) -> np.ndarray: ...


class PeerChannel:
    """Butterfly's data path: ``Activation`` messages through a :class:`Peer`."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self._request_id = 0

    async def send_array(self, array: np.ndarray) -> None:
        self._request_id += 1
        message = Activation(
            request_id=self._request_id,
            epoch=1,
            stage=1,
            origin="bench",
            layer=0,
            compute_s=0.0,
            session=0,
            position=0,
            keep=(),
            trace=(),
            report=False,
            tensor=array_to_wire(array),
        )
        await self.peer.send(message)

    async def receive_array(self) -> np.ndarray:
        message = await self.peer.receive()
        if not isinstance(message, Activation):
            raise RuntimeError(f"expected an Activation, got {type(message).__name__}")
        return array_from_wire(message.tensor, max_bytes=self.peer.max_message_size)


class FrameReader:
    """Length-prefixed frames read with ``recv_into`` a preallocated buffer.

    A returned frame is a view into the buffer, valid until the next :meth:`read`.
    """

    HEADER = struct.Struct("<Q")

    def __init__(self, stream: trio.SocketStream, max_frame: int, read_size: int) -> None:
        self._socket = stream.socket
        self._read_size = read_size
        self._buffer = bytearray(self.HEADER.size + max_frame + read_size)
        self._view = memoryview(self._buffer)
        self._start = 0  # first unconsumed byte
        self._end = 0  # one past the last received byte

    async def read(self) -> memoryview:
        await self._fill(self.HEADER.size)
        (length,) = self.HEADER.unpack_from(self._buffer, self._start)
        frame_end = self.HEADER.size + length
        if frame_end > len(self._buffer) - self._read_size:
            raise RuntimeError(f"frame of {length} bytes does not fit the reader's buffer")
        await self._fill(frame_end)
        frame = self._view[self._start + self.HEADER.size : self._start + frame_end]
        self._start += frame_end
        return frame

    async def _fill(self, needed: int) -> None:
        """Receive until ``needed`` unconsumed bytes are buffered."""
        if len(self._buffer) - self._start < needed + self._read_size:
            # Not enough room behind the pending bytes: move them to the front.
            pending = self._end - self._start
            self._view[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        while self._end - self._start < needed:
            space = self._view[self._end : self._end + self._read_size]
            received = await self._socket.recv_into(space)
            if received == 0:
                raise EOFError("the peer closed the connection")
            self._end += received


class RawChannel:
    """The baseline: a length prefix and the array's bytes on a plain TCP stream."""

    SMALL = 64 * 1024  # below this, one send of prefix + payload beats two sends

    def __init__(self, stream: trio.SocketStream, max_frame: int, read_size: int) -> None:
        self.stream = stream
        self._reader = FrameReader(stream, max_frame, read_size)

    async def send_array(self, array: np.ndarray) -> None:
        payload = array.data.cast("B")  # C-contiguous: no copy
        header = FrameReader.HEADER.pack(len(payload))
        if len(payload) < self.SMALL:
            await self.stream.send_all(header + payload)
        else:
            await self.stream.send_all(header)
            await self.stream.send_all(payload)

    async def receive_array(self) -> np.ndarray:
        return np.frombuffer(await self._reader.read(), dtype=np.float32)


# -- connected pairs: (the end that accepted, the end that dialled) ----------------------

Pair = tuple[Channel, Channel]


def _hello(role: str) -> Hello:
    return Hello(version=PROTOCOL_VERSION, node_id=f"bench-{role}", role=role)


@asynccontextmanager
async def open_handshaken_peer(
    conn: Connection,
    config: NetworkConfig,
    role: str,
    expect: str,
    *,
    secret: bytes | None = None,
    dialer: bool = False,
) -> AsyncIterator[Peer]:
    """A :class:`Peer` on ``conn`` after the handshake, as the worker opens them."""
    async with open_peer(
        conn,
        max_message_size=config.max_message_size,
        send_queue_size=config.send_queue_size,
        secret=secret,
        dialer=dialer,
    ) as peer:
        local = _hello(role)
        check = Handshake(local, expect_roles=frozenset({expect}))
        await peer.handshake(local, check, timeout=config.connect_timeout)
        yield peer


@asynccontextmanager
async def websocket_pair(config: NetworkConfig, secret: bytes | None = None) -> AsyncIterator[Pair]:
    """Two Butterfly peers joined by ``WebsocketTransport``; the accepting one is a "worker".

    With ``secret`` they authenticate and every frame carries its MAC, as in a cluster
    with a shared secret."""
    transport = WebsocketTransport(config)
    accepted_in, accepted_out = trio.open_memory_channel[Peer](1)
    finished = trio.Event()

    async def handler(conn: Connection) -> None:
        async with open_handshaken_peer(
            conn, config, "worker", expect="link", secret=secret
        ) as peer:
            await accepted_in.send(peer)
            await finished.wait()

    async with trio.open_nursery() as nursery:
        address = await nursery.start(transport.serve, f"ws://{LOOPBACK}:0", handler)
        async with (
            transport.connect(address) as conn,
            open_handshaken_peer(
                conn, config, "link", expect="worker", secret=secret, dialer=True
            ) as dialled,
        ):
            accepted = await accepted_out.receive()
            try:
                yield PeerChannel(accepted), PeerChannel(dialled)
            finally:
                finished.set()
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def raw_pair(max_frame: int, read_size: int) -> AsyncIterator[Pair]:
    """Two :class:`RawChannel` ends of one loopback TCP connection."""
    accepted_in, accepted_out = trio.open_memory_channel[trio.SocketStream](1)
    finished = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        await accepted_in.send(stream)
        await finished.wait()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=LOOPBACK))
        port = listeners[0].socket.getsockname()[1]
        async with await trio.open_tcp_stream(LOOPBACK, port) as dialled:
            accepted = await accepted_out.receive()
            try:
                yield (
                    RawChannel(accepted, max_frame, read_size),
                    RawChannel(dialled, max_frame, read_size),
                )
            finally:
                finished.set()
        nursery.cancel_scope.cancel()


# -- the two measurements ----------------------------------------------------------------


async def transfer_rate(sender: Channel, receiver: Channel, array: np.ndarray, count: int) -> float:
    """MB/s of moving ``count`` copies of ``array``: from the first send to the last decode."""

    async def send_all() -> None:
        for _ in range(count):
            await sender.send_array(array)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_all)
        for _ in range(count):
            received = await receiver.receive_array()
            if received.nbytes != array.nbytes:
                raise RuntimeError(f"received {received.nbytes} bytes, sent {array.nbytes}")
    elapsed = time.perf_counter() - start
    return count * array.nbytes / elapsed / 1e6


async def round_trip_us(client: Channel, server: Channel, array: np.ndarray, count: int) -> float:
    """Median microseconds of ``count`` echoes of ``array`` (client sends, server echoes)."""

    async def echo() -> None:
        for _ in range(count):
            await server.send_array(await server.receive_array())

    times: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(echo)
        for _ in range(count):
            start = time.perf_counter()
            await client.send_array(array)
            await client.receive_array()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


# -- the run -----------------------------------------------------------------------------

Sample = Callable[[], Awaitable[float]]


@dataclass(frozen=True)
class Scenario:
    name: str
    unit: str
    sample: Sample
    warmup: Sample


@contextlib.contextmanager
def tls_config(config: NetworkConfig) -> Iterator[NetworkConfig]:
    """``config`` with a certificate for 127.0.0.1 from a throwaway CA (trustme)."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert(LOOPBACK)
    with tempfile.TemporaryDirectory() as directory:
        cert, key, ca_file = (Path(directory) / n for n in ("cert.pem", "key.pem", "ca.pem"))
        leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_file))
        yield attrs.evolve(config, tls_cert=str(cert), tls_key=str(key), tls_ca=str(ca_file))


def scenarios(
    settings: Settings, websocket: Pair, authenticated: Pair, tls: Pair, raw: Pair
) -> list[Scenario]:
    """Every (name, sampler) of the run, on already connected pairs."""
    bulk = np.random.default_rng(0).standard_normal(settings.message_bytes // 4, dtype=np.float32)
    small = bulk[: settings.rtt_bytes // 4].copy()
    ws_accepted, ws_dialled = websocket
    raw_accepted, raw_dialled = raw
    auth_accepted, auth_dialled = authenticated
    tls_accepted, tls_dialled = tls

    def rate(sender: Channel, receiver: Channel) -> tuple[Sample, Sample]:
        return (
            lambda: transfer_rate(sender, receiver, bulk, settings.messages_per_sample),
            lambda: transfer_rate(sender, receiver, bulk, settings.warmup_messages),
        )

    def rtt(client: Channel, server: Channel) -> tuple[Sample, Sample]:
        return (
            lambda: round_trip_us(client, server, small, settings.round_trips_per_sample),
            lambda: round_trip_us(client, server, small, settings.warmup_round_trips),
        )

    return [
        Scenario("websocket accepted->dialled", "MB/s", *rate(ws_accepted, ws_dialled)),
        Scenario("websocket dialled->accepted", "MB/s", *rate(ws_dialled, ws_accepted)),
        Scenario("websocket+MAC accepted->dialled", "MB/s", *rate(auth_accepted, auth_dialled)),
        Scenario("wss+MAC accepted->dialled", "MB/s", *rate(tls_accepted, tls_dialled)),
        Scenario("raw TCP accepted->dialled", "MB/s", *rate(raw_accepted, raw_dialled)),
        Scenario("websocket round trip", "us", *rtt(ws_dialled, ws_accepted)),
        Scenario("websocket+MAC round trip", "us", *rtt(auth_dialled, auth_accepted)),
        Scenario("wss+MAC round trip", "us", *rtt(tls_dialled, tls_accepted)),
        Scenario("raw TCP round trip", "us", *rtt(raw_dialled, raw_accepted)),
    ]


async def run(settings: Settings) -> list[Summary]:
    config = NetworkConfig()
    with tls_config(config) as with_tls:
        async with (
            websocket_pair(config) as websocket,
            websocket_pair(config, secret=BENCH_SECRET) as authenticated,
            websocket_pair(with_tls, secret=BENCH_SECRET) as tls,
            raw_pair(settings.message_bytes, config.receive_buffer_size) as raw,
        ):
            return await _measure(settings, scenarios(settings, websocket, authenticated, tls, raw))


async def _measure(settings: Settings, plan: list[Scenario]) -> list[Summary]:
    for scenario in plan:
        await scenario.warmup()
    samples: dict[str, list[float]] = {s.name: [] for s in plan}
    for _ in range(settings.repeats):
        for scenario in plan:  # interleaved: drift hits every scenario alike
            samples[scenario.name].append(await scenario.sample())
    return [Summary(s.name, s.unit, samples[s.name]) for s in plan]


# -- reporting ---------------------------------------------------------------------------


def ratios(results: dict[str, Summary]) -> dict[str, dict[str, Any]]:
    throughput = (
        results["websocket accepted->dialled"].median / results["raw TCP accepted->dialled"].median
    )
    rtt = results["websocket round trip"].median / results["raw TCP round trip"].median
    # What authentication adds to a hop: the same stack with and without frame MACs.
    mac_cost = (
        results["websocket accepted->dialled"].median
        / results["websocket+MAC accepted->dialled"].median
        - 1
    )
    mac_rtt = (
        results["websocket+MAC round trip"].median / results["websocket round trip"].median - 1
    )
    return {
        # One thread does both ends here, so this is the MAC's CPU cost (two GMACs of
        # 4 MiB); what it adds to a hop between hosts is bench.wire's figure and target.
        "MAC CPU added to a 4 MiB hop": {
            "value": mac_cost,
            "target": "(info; bench.wire)",
            "met": True,
        },
        "MAC time added to a round trip": {
            "value": mac_rtt,
            "target": "(info)",
            "met": True,
        },
        "throughput wss+MAC/websocket+MAC": {
            "value": results["wss+MAC accepted->dialled"].median
            / results["websocket+MAC accepted->dialled"].median,
            "target": "(info)",
            "met": True,
        },
        "throughput websocket/raw": {
            "value": throughput,
            "target": f">= {THROUGHPUT_TARGET}",
            "met": throughput >= THROUGHPUT_TARGET,
        },
        "round trip websocket/raw": {
            "value": rtt,
            "target": f"<= {RTT_TARGET}",
            "met": rtt <= RTT_TARGET,
        },
    }


def report(settings: Settings, summaries: list[Summary], elapsed: float) -> dict[str, Any]:
    results = {s.name: s for s in summaries}
    return {
        "settings": asdict(settings),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "elapsed_s": elapsed,
        "results": {s.name: s.as_dict() for s in summaries},
        "ratios": ratios(results),
    }


def render(data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        f"Butterfly transport benchmark, loopback, {s['repeats']} interleaved repeats "
        f"(python {data['python']}, {data['elapsed_s']:.1f} s)",
        f"  throughput: {s['messages_per_sample']} x {s['message_bytes'] / MiB:g} MiB float32 "
        f"Activation per sample; round trip: {s['round_trips_per_sample']} x "
        f"{s['rtt_bytes']} B echoes per sample (median)",
        "",
        f"  {'scenario':<34}{'unit':>6}{'median':>10}{'min':>10}{'max':>10}",
    ]
    for name, r in data["results"].items():
        lines.append(
            f"  {name:<34}{r['unit']:>6}{r['median']:>10.1f}{r['min']:>10.1f}{r['max']:>10.1f}"
        )
    lines.append("")
    for name, r in data["ratios"].items():
        verdict = "met" if r["met"] else "MISSED"
        lines.append(f"  {name:<34}{r['value']:>6.2f}   target {r['target']}: {verdict}")
    masked = data["results"]["websocket dialled->accepted"]["median"]
    design = data["results"]["websocket accepted->dialled"]["median"]
    lines.append(
        f"  {'(info) dialled/accepted sender':<34}{masked / design:>6.2f}   "
        "masked client frames vs the design direction"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer messages and round trips")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--repeats", type=int, default=5, metavar="N", help="samples per scenario (default 5)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    settings = Settings.quick(args.repeats) if args.quick else Settings(repeats=args.repeats)
    start = time.perf_counter()
    summaries = trio.run(run, settings)
    data = report(settings, summaries, time.perf_counter() - start)
    print(render(data))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
