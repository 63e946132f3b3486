"""Heartbeats on a long-lived link, judged by a phi-accrual detector.

Every long-lived link runs one of these: coordinator→worker (the coordinator sends,
the worker answers and also watches) and worker→worker (the downstream worker, which
dialled, sends; the upstream worker answers and watches). A side that stops hearing
from the other closes the connection: a stopped process or a cut cable keeps a TCP
connection open, and suspicion is the only sign of it. Closing makes every pending
send on the link fail at once, so no task waits on a dead peer.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterator

import trio

from ..config import CoordinationConfig
from ..protocol import Heartbeat
from ..transport import Peer
from ..types import PROBE_BYTES, Link
from .detector import PhiAccrualDetector

__all__ = ["measure_link", "new_detector", "watch_link"]

log = logging.getLogger(__name__)


async def measure_link(ping: Callable[[int], Awaitable[float]]) -> Link:
    """Latency and bandwidth of a link from timed probes: ``ping(n)`` is the round trip of a
    probe that moves ``n`` bytes in the direction being measured. Three empty ones, then
    two of :data:`PROBE_BYTES`."""
    small = [await ping(0) for _ in range(3)]
    bulk = [await ping(PROBE_BYTES) for _ in range(2)]
    return Link.from_probes(small, bulk, PROBE_BYTES)


def new_detector(
    config: CoordinationConfig, *, interval: float | None = None
) -> PhiAccrualDetector:
    """A detector with the configured thresholds that has heard one heartbeat now.

    ``interval`` is the other side's heartbeat interval when it paces them (default: ours).
    """
    detector = PhiAccrualDetector(
        threshold=config.phi_threshold,
        window=config.phi_window,
        min_std=config.min_std_deviation,
        acceptable_pause=config.acceptable_heartbeat_pause,
        first_interval=interval or config.heartbeat_interval,
    )
    detector.heartbeat(trio.current_time())
    return detector


async def watch_link(
    peer: Peer,
    detector: PhiAccrualDetector,
    config: CoordinationConfig,
    *,
    label: str,
    send_heartbeats: bool,
    seq: Iterator[int] | None = None,
) -> None:
    """Every heartbeat interval: close ``peer`` if the other side is suspected, else (when
    ``send_heartbeats``) send it a Heartbeat. Returns once it closed the link.

    The caller's receive loop feeds ``detector.heartbeat(now)`` with what it hears.
    """
    seq = seq if seq is not None else itertools.count()
    interval = config.heartbeat_interval
    next_beat = trio.current_time() + interval if send_heartbeats else math.inf
    while True:
        # Wake for the next heartbeat to send, or when φ would cross the threshold if
        # nothing arrives meanwhile, whichever comes first (a ms late, so it has crossed).
        now = trio.current_time()
        await trio.sleep(max(0.0, min(next_beat - now, detector.time_to_suspicion(now) + 1e-3)))
        now = trio.current_time()
        level = detector.phi(now)
        if level >= config.phi_threshold:
            log.warning("%s suspected (phi %.1f): closing the link", label, level)
            await peer.conn.aclose()  # bounded: a close frame that cannot leave is given up
            return
        if now >= next_beat:
            next_beat = now + interval
            with trio.move_on_after(interval):
                await peer.send(Heartbeat(seq=next(seq)))
