"""The metrics service: every component emits typed events; this service turns them into
Prometheus series, a typed snapshot, and per-task traces.

``emit`` never waits: it puts the event on a bounded trio memory channel with
``send_nowait``, and when the channel is full the event is counted as dropped
(``butterfly_events_dropped_total``) and the hot path goes on. The service's task applies
events in passes (every 0.1 s, or when the channel is half full); ``snapshot()``,
``exposition()`` and ``trace()`` first apply what is still in the channel, so they see
every event emitted before they were called.

Series are built with ``prometheus_client`` in a registry of this service's own (never the
process-global one: two clients in one process must not share counters).
"""

from __future__ import annotations

import collections
import logging
import statistics
from typing import Any, Protocol

import attrs
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..config import MetricsConfig
from .events import (
    TASK_EVENTS,
    BytesTransferred,
    CacheReported,
    ConsensusReached,
    Event,
    FirstToken,
    LinkTransferred,
    MessageReceived,
    MessageSent,
    NodeFailure,
    PartitionCacheHit,
    PartitionCacheMiss,
    PartitionComputed,
    PhaseTransition,
    PlacementChanged,
    ReplicasDisagreed,
    SessionReplayed,
    StageComputed,
    TaskCancelled,
    TaskCompleted,
    TaskDispatched,
    TaskDispatching,
    TaskEnqueued,
    TaskFailed,
    TaskRetried,
    TaskSubmitted,
    TokenGenerated,
    WorkerQuarantined,
    WorkerStateChanged,
)

__all__ = ["MetricsService", "MetricsSink", "MetricsSnapshot"]

log = logging.getLogger(__name__)

# Seconds: from a 4 KiB hop (~100 µs) to a long generation (minutes).
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300,
)  # fmt: skip


#: Seconds between two passes of the service's task over the channel (sooner when it is
#: half full). Snapshots, expositions and traces apply what is pending themselves.
_APPLY_INTERVAL_S = 0.1


class MetricsSink(Protocol):
    """The narrow interface handed to every component."""

    def emit(self, event: Event) -> None: ...


@attrs.frozen
class MetricsSnapshot:
    """What ``Butterfly.metrics()`` returns: counters since the client started, latency
    percentiles over the last ``metrics.latency_window`` tasks (seconds, None before any)."""

    requests_completed: int
    requests_failed: dict[str, int]
    requests_cancelled: int
    requests_retried: dict[str, int]
    requests_resumed_from_checkpoint: int
    latency_p50_s: float | None
    latency_p99_s: float | None
    latency_mean_s: float | None
    queue_depth: int
    requests_in_flight: int
    tokens_generated: int
    time_to_first_token_p50_s: float | None
    session_replays: int
    placements: int
    consensus_reached: int
    phase_transitions: dict[str, int]
    plan_cache_hits: int
    plan_cache_misses: int
    last_planning_s: float
    worker_states: dict[str, str]
    node_failures: dict[str, int]
    #: Seconds of compute per (stage index, node id), summed over requests.
    stage_compute_s: dict[tuple[int, str], float]
    #: Tensor bytes per (source, destination) node id; the coordinator's own id at the ends.
    link_bytes: dict[tuple[str, str], int]
    messages_sent: int
    messages_received: int
    events_dropped: int
    #: Verification: stage outputs accepted by a quorum, per number of rounds it took;
    #: stages whose replicas disagreed (``agreed``: a quorum still decided,
    #: ``no_quorum``: the request failed); workers quarantined.
    stages_verified: dict[int, int] = attrs.field(factory=dict)
    replica_disagreements: dict[str, int] = attrs.field(factory=dict)
    quarantines: int = 0


class MetricsService:
    """Turns events into Prometheus series, a snapshot, and traces."""

    def __init__(self, config: MetricsConfig | None = None) -> None:
        self.config = config or MetricsConfig()
        self.registry = CollectorRegistry(auto_describe=True)
        self._enabled = self.config.enabled
        self._send, self._receive = trio.open_memory_channel[Event](self.config.event_queue_size)
        self._pending = trio.Event()  # set when the channel is half full
        self._unapplied = 0
        self._wake_at = max(1, self.config.event_queue_size // 2)
        self._series()
        # What the snapshot reads directly (prometheus_client's values are not meant to
        # be read back one by one).
        self.completed = 0
        self.failed: collections.Counter[str] = collections.Counter()
        self.cancelled = 0
        self.retried: collections.Counter[str] = collections.Counter()
        self.resumed = 0
        self.tokens = 0
        self.session_replays = 0
        self.placements = 0
        self.consensus = 0
        self.verified: collections.Counter[int] = collections.Counter()
        self.disagreements: collections.Counter[str] = collections.Counter()
        self.quarantines = 0
        self.plan_cache: collections.Counter[str] = collections.Counter()
        self.phases: collections.Counter[str] = collections.Counter()
        self.last_planning_s = 0.0
        self.worker_states: dict[str, str] = {}
        self.failures: collections.Counter[str] = collections.Counter()
        self.stage_compute: collections.defaultdict[tuple[int, str], float] = (
            collections.defaultdict(float)
        )
        self.link_bytes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.sent = 0
        self.received = 0
        self.dropped = 0
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._queued: set[int] = set()
        self._running: set[int] = set()
        self.latencies: collections.deque[float] = collections.deque(
            maxlen=self.config.latency_window
        )
        self.first_tokens: collections.deque[float] = collections.deque(
            maxlen=self.config.latency_window
        )
        # Computed when scraped: nothing to keep up to date per event.
        self.queue_depth.set_function(lambda: len(self._queued))
        self.in_flight.set_function(lambda: len(self._running))
        # The events of the last ``trace_tasks`` tasks, by task id.
        self._traces: collections.OrderedDict[int, list[Event]] = collections.OrderedDict()

    def _series(self) -> None:
        r = self.registry
        self.requests_total = Counter(
            "butterfly_requests", "Tasks finished, by status.", ["status"], registry=r
        )
        self.request_duration = Histogram(
            "butterfly_request_duration_seconds",
            "Time from submission to answer of completed tasks.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "butterfly_time_to_first_token_seconds",
            "Time from a generation's submission to its first new token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "butterfly_time_per_output_token_seconds",
            "Time between two new tokens of one generation.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_total = Counter(
            "butterfly_tokens_generated", "New tokens generated.", registry=r
        )
        self.queue_depth = Gauge(
            "butterfly_queue_depth", "Tasks waiting to be dispatched.", registry=r
        )
        self.in_flight = Gauge(
            "butterfly_requests_in_flight", "Tasks dispatched and not yet answered.", registry=r
        )
        self.stage_compute_seconds = Histogram(
            "butterfly_stage_compute_seconds",
            "Compute time of one request on one stage.",
            ["stage", "node"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_wait_seconds = Histogram(
            "butterfly_stage_wait_seconds",
            "Time a request waited on a worker for its device before computing.",
            ["stage", "node"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.link_bytes_total = Counter(
            "butterfly_link_bytes", "Tensor bytes carried per link.", ["src", "dst"], registry=r
        )
        self.link_transfer_seconds = Histogram(
            "butterfly_link_transfer_seconds",
            "Time an activation took from one node to the next (wall clocks of both hosts).",
            ["src", "dst"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.partition_seconds = Histogram(
            "butterfly_partition_seconds",
            "Time to compute a placement.",
            ["strategy"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.partition_cache_hits = Counter(
            "butterfly_partition_cache_hits", "Placements answered from the plan cache.", registry=r
        )
        self.partition_cache_misses = Counter(
            "butterfly_partition_cache_misses", "Placements computed anew.", registry=r
        )
        self.placements_total = Counter(
            "butterfly_placements", "Placements assigned to the workers.", registry=r
        )
        self.consensus_total = Counter(
            "butterfly_consensus_reached", "Placements every worker confirmed.", registry=r
        )
        self.stages_verified_total = Counter(
            "butterfly_stages_verified",
            "Stage outputs a quorum of replicas agreed on.",
            ["rounds"],
            registry=r,
        )
        self.verification_seconds = Histogram(
            "butterfly_verification_seconds",
            "Time from sending a verified stage's input to its accepted output.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.disagreements_total = Counter(
            "butterfly_replica_disagreements",
            "Verified stages whose replicas' outputs did not all agree.",
            ["outcome"],
            registry=r,
        )
        self.quarantines_total = Counter(
            "butterfly_quarantines", "Workers quarantined for contradicting a quorum.", registry=r
        )
        self.phase_total = Counter(
            "butterfly_phase_transitions", "Phase transitions.", ["scope", "phase"], registry=r
        )
        self.node_failures_total = Counter(
            "butterfly_node_failures", "Workers declared failed.", ["reason"], registry=r
        )
        self.retries_total = Counter(
            "butterfly_retries", "Tasks run again after a failure.", ["reason"], registry=r
        )
        self.session_replays_total = Counter(
            "butterfly_session_replays",
            "Generation sessions whose caches were rebuilt.",
            registry=r,
        )
        self.workers_up = Gauge(
            "butterfly_worker_up",
            "1 while a worker is ready (connected and serving).",
            ["node"],
            registry=r,
        )
        self.kv_cache_bytes = Gauge(
            "butterfly_kv_cache_bytes", "KV-cache bytes a worker holds.", ["node"], registry=r
        )
        self.messages_total = Counter(
            "butterfly_messages", "Messages to and from workers.", ["direction", "kind"], registry=r
        )
        self.message_bytes_total = Counter(
            "butterfly_message_bytes",
            "Bytes of messages to and from workers.",
            ["direction"],
            registry=r,
        )
        self.tensor_bytes_total = Counter(
            "butterfly_tensor_bytes",
            "Tensor bytes to and from workers.",
            ["direction", "peer"],
            registry=r,
        )
        self.events_dropped_total = Counter(
            "butterfly_events_dropped", "Events dropped because the channel was full.", registry=r
        )

    # -- emitting ---------------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Queue ``event``; never waits (a full channel drops and counts it)."""
        if not self._enabled:
            return
        try:
            self._send.send_nowait(event)
        except trio.WouldBlock:
            self.dropped += 1
            self.events_dropped_total.inc()
            return
        # The service's task is woken only when the channel is half full: a wake-up per
        # event (a scheduler pass each) cost ~20 µs per event, more than the event itself.
        self._unapplied += 1
        if self._unapplied >= self._wake_at and not self._pending.is_set():
            self._pending.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Apply events as they come; log a summary every ``export_interval_secs``."""
        async with trio.open_nursery() as nursery:
            if self.config.export_interval_secs > 0:
                nursery.start_soon(self._export_to_log)
            task_status.started()
            while True:
                # No task ever waits in the channel's receive: an event handed straight to
                # a waiting task would be invisible to a snapshot until that task ran.
                with trio.move_on_after(_APPLY_INTERVAL_S):
                    await self._pending.wait()
                self._pending = trio.Event()
                self._catch_up()

    async def _export_to_log(self) -> None:
        while True:
            await trio.sleep(self.config.export_interval_secs)
            s = self.snapshot()
            log.info(
                "metrics: %d completed, %d failed, %d queued, %d in flight, p50 %s s, "
                "p99 %s s, %d tokens, %d events dropped",
                s.requests_completed,
                sum(s.requests_failed.values()),
                s.queue_depth,
                s.requests_in_flight,
                _rounded(s.latency_p50_s),
                _rounded(s.latency_p99_s),
                s.tokens_generated,
                s.events_dropped,
            )

    def _catch_up(self) -> None:
        self._unapplied = 0
        while True:
            try:
                event = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            self._apply(event)

    # -- applying ---------------------------------------------------------------------------

    def _apply(self, event: Event) -> None:
        if isinstance(event, StageComputed | LinkTransferred):
            for task in event.tasks:  # one request, every task of its micro-batch
                self._trace(task, event)
        elif isinstance(event, TASK_EVENTS):
            self._trace(event.task_id, event)
        match event:
            case TaskSubmitted():
                pass
            case TaskEnqueued(task_id=task):
                self._queued.add(task)
            case TaskDispatching(task_id=task):
                self._queued.discard(task)
                self._running.add(task)
            case TaskDispatched():
                pass
            case TaskRetried(reason=reason, layer=layer):
                self.retried[reason] += 1
                self._child(self.retries_total, reason).inc()
                self.resumed += layer > 0
            case TaskCompleted(task_id=task, latency_s=latency):
                self._finished(task)
                self.completed += 1
                self.latencies.append(latency)
                self._child(self.requests_total, "completed").inc()
                self.request_duration.observe(latency)
            case TaskFailed(task_id=task, kind=kind):
                self._finished(task)
                self.failed[kind] += 1
                self._child(self.requests_total, f"failed_{kind}").inc()
            case TaskCancelled(task_id=task):
                self._finished(task)
                self.cancelled += 1
                self._child(self.requests_total, "cancelled").inc()
            case StageComputed(stage=stage, node=node, wait_s=wait, compute_s=compute):
                self.stage_compute[(stage, node)] += compute
                self._child(self.stage_compute_seconds, str(stage), node).observe(compute)
                self._child(self.stage_wait_seconds, str(stage), node).observe(wait)
            case LinkTransferred(src=src, dst=dst, seconds=seconds, nbytes=nbytes):
                self.link_bytes[(src, dst)] += nbytes
                self._child(self.link_bytes_total, src, dst).inc(nbytes)
                self._child(self.link_transfer_seconds, src, dst).observe(max(seconds, 0.0))
            case FirstToken(seconds=seconds, rows=rows):
                self.tokens += rows
                self.first_tokens.append(seconds)
                self.tokens_total.inc(rows)
                self.ttft.observe(seconds)
            case TokenGenerated(seconds=seconds, rows=rows):
                self.tokens += rows
                self.tokens_total.inc(rows)
                self.tpot.observe(seconds)
            case SessionReplayed():
                self.session_replays += 1
                self.session_replays_total.inc()
            case PartitionComputed(strategy=strategy, duration_s=duration):
                self.last_planning_s = duration
                self._child(self.partition_seconds, strategy).observe(duration)
            case PartitionCacheHit():
                self.plan_cache["hits"] += 1
                self.partition_cache_hits.inc()
            case PartitionCacheMiss():
                self.plan_cache["misses"] += 1
                self.partition_cache_misses.inc()
            case PlacementChanged():
                self.placements += 1
                self.placements_total.inc()
            case ConsensusReached(stage=stage, rounds=rounds, seconds=seconds) if stage >= 0:
                self.verified[rounds] += 1
                self._child(self.stages_verified_total, str(rounds)).inc()
                self.verification_seconds.observe(seconds)
            case ConsensusReached():
                self.consensus += 1
                self.consensus_total.inc()
            case ReplicasDisagreed(agreed=agreed):
                outcome = "agreed" if agreed else "no_quorum"
                self.disagreements[outcome] += 1
                self._child(self.disagreements_total, outcome).inc()
            case WorkerQuarantined():
                self.quarantines += 1
                self.quarantines_total.inc()
            case PhaseTransition(scope=scope, phase=phase):
                self.phases[f"{scope}:{phase}"] += 1
                self._child(self.phase_total, scope, phase).inc()
            case WorkerStateChanged(node_id=node, state=state):
                self.worker_states[node] = state
                self._child(self.workers_up, node).set(1 if state == "ready" else 0)
            case CacheReported(node_id=node, kv_cache_bytes=nbytes):
                self._child(self.kv_cache_bytes, node).set(nbytes)
            case NodeFailure(reason=reason):
                self.failures[reason] += 1
                self._child(self.node_failures_total, reason).inc()
            case MessageSent(kind=kind, nbytes=nbytes):
                self.sent += 1
                self._child(self.messages_total, "out", kind).inc()
                self._child(self.message_bytes_total, "out").inc(nbytes)
            case MessageReceived(kind=kind, nbytes=nbytes):
                self.received += 1
                self._child(self.messages_total, "in", kind).inc()
                self._child(self.message_bytes_total, "in").inc(nbytes)
            case BytesTransferred(peer=peer, direction=direction, nbytes=nbytes):
                self._child(self.tensor_bytes_total, direction, peer).inc(nbytes)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: prometheus_client's lookup validates and
        locks on every call, which the hot path would pay per event."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _finished(self, task: int) -> None:
        self._queued.discard(task)
        self._running.discard(task)

    def _trace(self, task: int, event: Event) -> None:
        events = self._traces.get(task)
        if events is None:
            events = self._traces[task] = []
            while len(self._traces) > self.config.trace_tasks:
                self._traces.popitem(last=False)
        if len(events) < self.config.trace_events_per_task:
            events.append(event)

    # -- reading ----------------------------------------------------------------------------

    def snapshot(self) -> MetricsSnapshot:
        """Counters and latency percentiles of everything emitted so far."""
        self._catch_up()
        return MetricsSnapshot(
            requests_completed=self.completed,
            requests_failed=dict(self.failed),
            requests_cancelled=self.cancelled,
            requests_retried=dict(self.retried),
            requests_resumed_from_checkpoint=self.resumed,
            latency_p50_s=_percentile(self.latencies, 0.5),
            latency_p99_s=_percentile(self.latencies, 0.99),
            latency_mean_s=statistics.fmean(self.latencies) if self.latencies else None,
            queue_depth=len(self._queued),
            requests_in_flight=len(self._running),
            tokens_generated=self.tokens,
            time_to_first_token_p50_s=_percentile(self.first_tokens, 0.5),
            session_replays=self.session_replays,
            placements=self.placements,
            consensus_reached=self.consensus,
            phase_transitions=dict(self.phases),
            plan_cache_hits=self.plan_cache["hits"],
            plan_cache_misses=self.plan_cache["misses"],
            last_planning_s=self.last_planning_s,
            worker_states=dict(self.worker_states),
            node_failures=dict(self.failures),
            stage_compute_s=dict(self.stage_compute),
            link_bytes=dict(self.link_bytes),
            messages_sent=self.sent,
            messages_received=self.received,
            events_dropped=self.dropped,
            stages_verified=dict(self.verified),
            replica_disagreements=dict(self.disagreements),
            quarantines=self.quarantines,
        )

    def exposition(self) -> str:
        """The Prometheus text format of every series."""
        self._catch_up()
        return generate_latest(self.registry).decode()

    def trace(self, task_id: int) -> list[Event]:
        """The events of task ``task_id`` in the order they happened (the last
        ``metrics.trace_tasks`` tasks are kept); empty for a task never seen."""
        self._catch_up()
        return sorted(self._traces.get(task_id, ()), key=lambda e: e.at)


def _percentile(values: collections.deque[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def _rounded(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
