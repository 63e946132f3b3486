"""The metrics service: components emit events into a bounded channel; one task aggregates them.

Emitting never blocks the hot path: when the channel is full the event is counted as
dropped instead of waiting.
"""

from __future__ import annotations

import collections
import statistics

import trio

from ..config import MetricsConfig
from .events import Event, PlacementChanged, RequestCompleted, RequestFailed, WorkerStateChanged

__all__ = ["MetricsService", "MetricsSink"]


class MetricsSink:
    """The emitting end handed to every component."""

    def __init__(self, channel: trio.MemorySendChannel[Event]) -> None:
        self._channel = channel
        self.dropped = 0

    def emit(self, event: Event) -> None:
        try:
            self._channel.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped += 1


class MetricsService:
    """Collects events into counters and a latency window; ``snapshot()`` reads them."""

    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.config = config or MetricsConfig()
        send, self._receive = trio.open_memory_channel[Event](self.config.event_queue_size)
        self.sink = MetricsSink(send)
        self.completed = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.worker_states: dict[str, str] = {}
        self.placements = 0
        self.latencies: collections.deque[float] = collections.deque(
            maxlen=self.config.latency_window
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for event in self._receive:
            self.record(event)

    def record(self, event: Event) -> None:
        match event:
            case RequestCompleted(latency_s=latency):
                self.completed += 1
                self.latencies.append(latency)
            case RequestFailed(kind=kind):
                self.failed[kind] += 1
            case WorkerStateChanged(node_id=node, state=state):
                self.worker_states[node] = state
            case PlacementChanged():
                self.placements += 1

    def snapshot(self) -> dict[str, object]:
        """Counters and latency percentiles (seconds) of everything emitted so far."""
        # Fold in events still in the channel, so a snapshot taken right after a request counts it.
        while True:
            try:
                self.record(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        return {
            "requests_completed": self.completed,
            "requests_failed": dict(self.failed),
            "latency_p50_s": pct(0.5),
            "latency_p99_s": pct(0.99),
            "latency_mean_s": statistics.fmean(lat) if lat else None,
            "placements": self.placements,
            "worker_states": dict(self.worker_states),
            "events_dropped": self.sink.dropped,
        }
