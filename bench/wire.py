"""One activation hop between two processes over an emulated wire: what the frame MACs add.

``bench.transport`` runs both ends in one thread, so it measures the *CPU cost* of a
stack: there the MAC of a 4 MiB frame (AES-GMAC at about 17 GB/s here, computed by the
sender and again by the receiver) adds a fixed ~0.5 ms to a ~2 ms hop whatever is done.
In a cluster the two ends are different hosts and the bytes cross a wire; Butterfly
feeds each chunk of a large frame to its MAC as the chunk goes out or comes in, so the
MAC runs while the rest of the frame travels. This benchmark measures that, as a
deployment sees it (needs root):

* the receiver ("worker", the side that accepted the connection: the design direction)
  runs in a network namespace behind a veth pair and a bridge (``tests/netns/network.py``);
  its egress is shaped with tc's token bucket filter to ``--rate`` (e.g. ``10gbit``,
  ``1gbit``; ``none`` leaves the veth unshaped: a memory copy on this machine's cores);
* the caller, in the root namespace, asks for one 4 MiB float32 activation at a time
  (a 1-element one) and times from the request to the decoded answer: one hop;
* stacks side by side, interleaved in rounds: raw TCP (length prefix, ``recv_into``),
  Butterfly's websocket ``Peer`` without a secret, and with one (authenticated handshake
  and a 16-byte AES-GMAC tag on every frame).

Reported: the median hop per stack, and the MAC's share (``websocket+MAC`` over
``websocket``, minus 1; target < 5 %). Run it as
``sudo .venv/bin/python -m bench.wire --rate 10gbit --rate 1gbit``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import trio

from bench.transport import (
    BENCH_SECRET,
    MAC_TARGET,
    Channel,
    PeerChannel,
    RawChannel,
    open_handshaken_peer,
)
from butterfly.config import NetworkConfig
from butterfly.transport import Connection, WebsocketTransport
from tests.netns.network import Network, NetworkSetupError, purge

MiB = 1 << 20
STACKS = ("raw TCP", "websocket", "websocket+MAC")
PORTS = {"raw TCP": 47001, "websocket": 47002, "websocket+MAC": 47003}


# -- the receiver's side: serves one activation per request, in the namespace ---------------


async def serve(stack: str, port: int, message_bytes: int) -> None:
    """Answer every small request with one ``message_bytes`` activation, until killed."""
    bulk = np.random.default_rng(0).standard_normal(message_bytes // 4, dtype=np.float32)
    config = NetworkConfig()

    async def answer(channel: Channel) -> None:
        while True:
            await channel.receive_array()
            await channel.send_array(bulk)

    if stack == "raw TCP":

        async def on_stream(stream: trio.SocketStream) -> None:
            with contextlib.suppress(Exception):  # the caller hung up
                await answer(RawChannel(stream, message_bytes, config.receive_buffer_size))

        await trio.serve_tcp(on_stream, port, host="0.0.0.0")
        return
    secret = BENCH_SECRET if stack == "websocket+MAC" else None

    async def on_connection(conn: Connection) -> None:
        async with open_handshaken_peer(conn, config, "worker", "link", secret=secret) as peer:
            with contextlib.suppress(Exception):  # the caller hung up
                await answer(PeerChannel(peer))

    await WebsocketTransport(config).serve(f"ws://0.0.0.0:{port}", on_connection)


# -- the caller's side ---------------------------------------------------------------------


async def wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    """Until the server process, still starting, accepts TCP connections on ``port``."""
    with trio.fail_after(timeout):
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.1)
                continue
            await stream.aclose()
            return


@asynccontextmanager
async def dial(stack: str, host: str, port: int, message_bytes: int) -> AsyncIterator[Channel]:
    config = NetworkConfig()
    await wait_listening(host, port)
    if stack == "raw TCP":
        async with await trio.open_tcp_stream(host, port) as stream:
            yield RawChannel(stream, message_bytes, config.receive_buffer_size)
        return
    secret = BENCH_SECRET if stack == "websocket+MAC" else None
    async with (
        WebsocketTransport(config).connect(f"ws://{host}:{port}") as conn,
        open_handshaken_peer(conn, config, "link", "worker", secret=secret, dialer=True) as peer,
    ):
        yield PeerChannel(peer)


async def hops(channel: Channel, count: int, message_bytes: int) -> list[float]:
    """Seconds from each request to its decoded ``message_bytes`` answer."""
    request = np.zeros(1, dtype=np.float32)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        await channel.send_array(request)
        answer = await channel.receive_array()
        times.append(time.perf_counter() - start)
        if answer.nbytes != message_bytes:
            raise RuntimeError(f"received {answer.nbytes} bytes, expected {message_bytes}")
    return times


@dataclass(frozen=True)
class Settings:
    rate: str
    message_bytes: int = 4 * MiB
    hops_per_sample: int = 40
    warmup_hops: int = 10
    repeats: int = 7


async def measure(settings: Settings, host: str) -> dict[str, list[float]]:
    """Per stack, the median hop of each of ``repeats`` samples, stacks interleaved."""
    samples: dict[str, list[float]] = {stack: [] for stack in STACKS}
    async with (
        dial("raw TCP", host, PORTS["raw TCP"], settings.message_bytes) as raw,
        dial("websocket", host, PORTS["websocket"], settings.message_bytes) as ws,
        dial("websocket+MAC", host, PORTS["websocket+MAC"], settings.message_bytes) as mac,
    ):
        channels = {"raw TCP": raw, "websocket": ws, "websocket+MAC": mac}
        for channel in channels.values():
            await hops(channel, settings.warmup_hops, settings.message_bytes)
        for _ in range(settings.repeats):
            for stack, channel in channels.items():
                times = await hops(channel, settings.hops_per_sample, settings.message_bytes)
                samples[stack].append(statistics.median(times))
    return samples


def shape(network: Network, rate: str) -> None:
    """The namespace's egress (the activations' direction) limited to ``rate``."""
    if rate == "none":
        return
    # A burst of a few 64 KiB GSO segments; latency bounds the queue, not the hop.
    done = subprocess.run(
        ["ip", "netns", "exec", network.namespace(0), "tc", "qdisc", "replace", "dev",
         network.namespace_end(0), "root", "tbf", "rate", rate, "burst", "256kb",
         "latency", "50ms"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise NetworkSetupError(f"tc could not shape the link to {rate}: {done.stderr.strip()}")


def run(settings: Settings) -> dict[str, Any]:
    network = Network(1)
    purge()
    network.create()
    servers: list[subprocess.Popen[bytes]] = []
    try:
        shape(network, settings.rate)
        for stack in STACKS:
            command = [
                *("ip", "netns", "exec", network.namespace(0), sys.executable, "-m"),
                *("bench.wire", "--serve", stack, "--port", str(PORTS[stack])),
                *("--message-bytes", str(settings.message_bytes)),
            ]
            servers.append(subprocess.Popen(command, cwd=Path(__file__).resolve().parent.parent))
        samples = trio.run(measure, settings, network.address(0))
    finally:
        for server in servers:
            server.kill()
            server.wait()
        network.destroy()
    medians = {stack: statistics.median(values) for stack, values in samples.items()}
    mac_share = medians["websocket+MAC"] / medians["websocket"] - 1
    return {
        "rate": settings.rate,
        "message_bytes": settings.message_bytes,
        "samples_s": samples,
        "median_hop_ms": {stack: m * 1e3 for stack, m in medians.items()},
        "wire_MB_per_s": {s: settings.message_bytes / m / 1e6 for s, m in medians.items()},
        "MAC time added to a hop": mac_share,
        "MAC target met": mac_share < MAC_TARGET,
        "websocket/raw hop": medians["websocket"] / medians["raw TCP"],
    }


def render(result: dict[str, Any]) -> str:
    lines = [f"link {result['rate']}, {result['message_bytes'] / MiB:g} MiB activation per hop"]
    for stack in STACKS:
        lines.append(
            f"  {stack:<16}{result['median_hop_ms'][stack]:8.2f} ms"
            f"{result['wire_MB_per_s'][stack]:9.0f} MB/s   samples "
            + " ".join(f"{s * 1e3:.2f}" for s in result["samples_s"][stack])
        )
    share = result["MAC time added to a hop"]
    verdict = "met" if result["MAC target met"] else "MISSED"
    lines.append(f"  MAC time added to a hop {share:+.1%}   target < {MAC_TARGET:.0%}: {verdict}")
    lines.append(f"  websocket/raw hop time  {result['websocket/raw hop']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--rate", action="append", help="tc rate of the link, or 'none' (repeatable)"
    )
    parser.add_argument("--repeats", type=int, default=7, metavar="N")
    parser.add_argument("--hops", type=int, default=40, metavar="N", help="hops per sample")
    parser.add_argument("--message-bytes", type=int, default=4 * MiB)
    parser.add_argument("--json", type=Path, metavar="PATH")
    parser.add_argument("--serve", choices=STACKS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        trio.run(partial(serve, args.serve, args.port, args.message_bytes))
        return 0
    if os.geteuid() != 0:
        print("bench.wire needs root (network namespaces and tc)", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.hops < 1:
        parser.error("--repeats and --hops must be at least 1")
    results = []
    for rate in args.rate or ["10gbit", "1gbit"]:
        settings = Settings(
            rate, message_bytes=args.message_bytes, hops_per_sample=args.hops,
            repeats=args.repeats,
        )  # fmt: skip
        try:
            result = run(settings)
        except NetworkSetupError as exc:
            print(f"bench.wire cannot run here: {exc}", file=sys.stderr)
            return 2
        print(render(result), flush=True)
        results.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
