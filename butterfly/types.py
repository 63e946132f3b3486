"""Shared vocabulary of the library: what ``Butterfly.cluster()`` returns, and friends."""

from __future__ import annotations

import enum

import attrs

from .protocol import InputSpec

__all__ = [
    "ClusterInfo",
    "LayerInfo",
    "Link",
    "ModelPartition",
    "NodeCapability",
    "NodeId",
    "PartitionQuality",
    "StageInfo",
    "Topology",
    "WorkerInfo",
    "WorkerState",
]

NodeId = str


@attrs.frozen
class LayerInfo:
    """One layer as the planner sees it.

    ``compute_cost`` is milliseconds per request on a node of ``compute_power`` 1.0;
    ``memory_bytes`` its weights (and buffers); ``output_bytes`` its activation per request.
    """

    id: int
    compute_cost: float
    memory_bytes: int
    output_bytes: int


@attrs.frozen
class NodeCapability:
    """One worker as the planner sees it: relative speed and free memory."""

    node_id: NodeId
    #: Relative speed: a layer of ``compute_cost`` c takes c / compute_power ms here.
    compute_power: float
    memory_bytes: int
    address: str = ""


@attrs.frozen
class Link:
    bandwidth_bytes_per_s: float
    latency_s: float

    @classmethod
    def from_probes(cls, round_trips_s: list[float], bulk_s: list[float], nbytes: int) -> Link:
        """From the round trips of empty probes and of probes moving ``nbytes`` one way:
        latency is half the fastest round trip, bandwidth what the bytes added to it."""
        rtt = min(round_trips_s)
        return cls(bandwidth_bytes_per_s=nbytes / max(min(bulk_s) - rtt, 1e-6), latency_s=rtt / 2)


#: Bytes of the probe that measures a link's bandwidth.
PROBE_BYTES = 1 << 20


@attrs.frozen
class Topology:
    """Measured links between nodes (directed: from sender to receiver); others use ``default``."""

    links: tuple[tuple[NodeId, NodeId, Link], ...] = ()
    default: Link = Link(bandwidth_bytes_per_s=1e9, latency_s=1e-4)

    def link(self, sender: NodeId, receiver: NodeId) -> Link:
        for a, b, link in self.links:
            if (a, b) == (sender, receiver):
                return link
        return self.default


@attrs.frozen
class ModelPartition:
    """One stage of a plan: ``layer_range`` on ``assigned_node``, taking ``estimated_time_ms`` per request
    (its compute plus sending its output to the next stage)."""

    id: int
    layer_range: range
    assigned_node: NodeId
    estimated_time_ms: float


@attrs.frozen
class PartitionQuality:
    """How good a plan is, computed from the plan and its inputs.

    Per node, not per stage: a node holding several stages carries their sum.

    ``load_balance``: least loaded node's time / busiest node's time (1.0 is perfect balance);
    ``communication_volume_mb``: activation megabytes crossing between nodes per request;
    ``peak_memory_gb``: the most weight memory any node holds;
    ``estimated_latency_ms``: one request's time through every stage and transfer;
    ``estimated_throughput_rps``: requests per second when pipelined (1000 / busiest node's time).
    """

    load_balance: float
    communication_volume_mb: float
    peak_memory_gb: float
    estimated_latency_ms: float
    estimated_throughput_rps: float


class WorkerState(enum.StrEnum):
    """A worker as the coordinator sees it."""

    CONNECTING = "connecting"
    READY = "ready"
    FAILED = "failed"
    REFUSED = "refused"  # reachable, but serves other weights than the cluster
    #: Caught contradicting an accepted quorum: never placed until ``release(node_id)``.
    QUARANTINED = "quarantined"


@attrs.frozen
class WorkerInfo:
    node_id: NodeId
    address: str
    state: WorkerState
    #: Why the worker is failed or refused ("" otherwise).
    reason: str = ""
    #: The coordinator's measured link to it (bandwidth, latency); None until measured.
    link: Link | None = None


@attrs.frozen
class StageInfo:
    index: int
    layers: range
    node_id: NodeId
    address: str


@attrs.frozen
class ClusterInfo:
    """The workers and the current placement (which layer range runs on which worker)."""

    model: str
    fingerprint: str
    num_layers: int
    epoch: int
    workers: tuple[WorkerInfo, ...]
    stages: tuple[StageInfo, ...]
    #: What the first stage accepts (checked before a request is sent).
    input_spec: InputSpec = attrs.field(factory=InputSpec)
    #: The placement strategy that made ``stages``, and its estimated quality.
    strategy: str = ""
    quality: PartitionQuality | None = None
    #: Ready workers the plan leaves without a stage (using them would slow the pipeline).
    idle: tuple[NodeId, ...] = ()
    #: Links between workers as the receiving worker measured them: (sender, receiver, link).
    #: The placement used these; pairs not measured yet were estimated.
    worker_links: tuple[tuple[NodeId, NodeId, Link], ...] = ()
    #: Further holders of stages (``coordination.verification``): verified requests run
    #: each stage on its worker in ``stages`` and on these.
    replicas: tuple[StageInfo, ...] = ()

    def __str__(self) -> str:
        lines = [
            f"model {self.model} ({self.num_layers} layers, fingerprint {self.fingerprint[:12]})"
        ]
        for w in self.workers:
            note = " (idle: the pipeline is faster without it)" if w.node_id in self.idle else ""
            if w.state == WorkerState.QUARANTINED:
                note = f" ({w.reason})"
            lines.append(f"  worker {w.node_id} {w.address} {w.state}{note}")
        for s in self.stages:
            replicas = [r.node_id for r in self.replicas if r.index == s.index]
            also = f" (replicas {', '.join(replicas)})" if replicas else ""
            lines.append(
                f"  stage {s.index}: layers {s.layers.start}..{s.layers.stop - 1} on {s.node_id}{also}"
            )
        for a, b, link in self.worker_links:
            lines.append(
                f"  link {a} -> {b}: {link.bandwidth_bytes_per_s / 1e6:.0f} MB/s, "
                f"{link.latency_s * 1e6:.0f} us"
            )
        if self.quality is not None:
            q = self.quality
            lines.append(
                f"  plan {self.strategy}: est. {q.estimated_throughput_rps:.1f} req/s, "
                f"latency {q.estimated_latency_ms:.1f} ms, balance {q.load_balance:.2f}"
            )
        return "\n".join(lines)
