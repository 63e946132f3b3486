"""The metrics service: every component emits typed events; the collector aggregates them.

Recording an event is O(1) and never waits, so components call ``emit`` on the hot
path directly. (A memory channel to a collector task was tried first: an event handed
to the waiting collector task is invisible until that task runs, so a snapshot taken
right after a request could miss it.) Prometheus exposition plugs in here later.
"""

from __future__ import annotations

import collections
import statistics
from typing import Protocol

import trio

from ..config import MetricsConfig
from .events import (
    Event,
    PhaseChanged,
    PlacementChanged,
    PlanComputed,
    RequestCompleted,
    RequestFailed,
    RequestRetried,
    SessionReplayed,
    WorkerStateChanged,
)

__all__ = ["MetricsService", "MetricsSink"]


class MetricsSink(Protocol):
    """The narrow interface handed to every component."""

    def emit(self, event: Event) -> None: ...


class MetricsService:
    """Collects events into counters and a latency window; ``snapshot()`` reads them."""

    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.config = config or MetricsConfig()
        self.completed = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.retried: collections.Counter[str] = collections.Counter()
        self.resumed = 0
        self.session_replays = 0
        self.worker_states: dict[str, str] = {}
        self.placements = 0
        self.plan_cache = collections.Counter[str]()
        self.phases = collections.Counter[str]()
        self.last_planning_s = 0.0
        self.latencies: collections.deque[float] = collections.deque(
            maxlen=self.config.latency_window
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to do in the background yet; exporters will run here."""
        task_status.started()
        await trio.sleep_forever()

    def emit(self, event: Event) -> None:
        match event:
            case RequestCompleted(latency_s=latency):
                self.completed += 1
                self.latencies.append(latency)
            case RequestFailed(kind=kind):
                self.failed[kind] += 1
            case RequestRetried(reason=reason, layer=layer):
                self.retried[reason] += 1
                self.resumed += layer > 0
            case SessionReplayed():
                self.session_replays += 1
            case WorkerStateChanged(node_id=node, state=state):
                self.worker_states[node] = state
            case PlacementChanged():
                self.placements += 1
            case PhaseChanged(scope=scope, phase=phase):
                self.phases[f"{scope}:{phase}"] += 1
            case PlanComputed(cache_hit=hit, planning_s=planning_s):
                self.plan_cache["hits" if hit else "misses"] += 1
                if not hit:
                    self.last_planning_s = planning_s

    def snapshot(self) -> dict[str, object]:
        """Counters and latency percentiles (seconds) of everything emitted so far."""
        lat = sorted(self.latencies)

        def pct(q: float) -> float | None:
            return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        return {
            "requests_completed": self.completed,
            "requests_failed": dict(self.failed),
            "requests_retried": dict(self.retried),
            "requests_resumed_from_checkpoint": self.resumed,
            "session_replays": self.session_replays,
            "latency_p50_s": pct(0.5),
            "latency_p99_s": pct(0.99),
            "latency_mean_s": statistics.fmean(lat) if lat else None,
            "placements": self.placements,
            "phase_transitions": dict(self.phases),
            "plan_cache_hits": self.plan_cache["hits"],
            "plan_cache_misses": self.plan_cache["misses"],
            "last_planning_s": self.last_planning_s,
            "worker_states": dict(self.worker_states),
        }
