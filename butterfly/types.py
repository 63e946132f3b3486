"""Shared vocabulary of the library: what ``Butterfly.cluster()`` returns, and friends."""

from __future__ import annotations

import enum

import attrs

from .protocol import InputSpec

__all__ = ["ClusterInfo", "NodeId", "StageInfo", "WorkerInfo", "WorkerState"]

NodeId = str


class WorkerState(enum.StrEnum):
    """A worker as the coordinator sees it."""

    CONNECTING = "connecting"
    READY = "ready"
    FAILED = "failed"
    REFUSED = "refused"  # reachable, but serves other weights than the cluster


@attrs.frozen
class WorkerInfo:
    node_id: NodeId
    address: str
    state: WorkerState
    #: Why the worker is failed or refused ("" otherwise).
    reason: str = ""


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

    def __str__(self) -> str:
        lines = [
            f"model {self.model} ({self.num_layers} layers, fingerprint {self.fingerprint[:12]})"
        ]
        lines += [f"  worker {w.node_id} {w.address} {w.state}" for w in self.workers]
        lines += [
            f"  stage {s.index}: layers {s.layers.start}..{s.layers.stop - 1} on {s.node_id}"
            for s in self.stages
        ]
        return "\n".join(lines)
