"""Events that components emit for the metrics collector."""

from __future__ import annotations

import attrs

__all__ = [
    "Event",
    "PhaseChanged",
    "PlacementChanged",
    "PlanComputed",
    "RequestCompleted",
    "RequestFailed",
    "RequestRetried",
    "SessionReplayed",
    "WorkerStateChanged",
]


@attrs.frozen
class RequestCompleted:
    request_id: int
    latency_s: float
    batch: int


@attrs.frozen
class RequestFailed:
    request_id: int
    kind: str


@attrs.frozen
class RequestRetried:
    """Request ``request_id`` runs again (``attempt`` ≥ 1) after a failure of kind ``reason``,
    starting at layer ``layer``: 0 from its input, more from a checkpoint."""

    request_id: int
    attempt: int
    reason: str
    layer: int


@attrs.frozen
class SessionReplayed:
    """Generation session ``session_id`` resent all its ``tokens``: its stages' caches were
    gone (a lost worker, an eviction, or a new placement)."""

    session_id: int
    tokens: int


@attrs.frozen
class WorkerStateChanged:
    node_id: str
    state: str


@attrs.frozen
class PlacementChanged:
    epoch: int
    stages: int
    planning_s: float


@attrs.frozen
class PlanComputed:
    cache_hit: bool
    planning_s: float
    strategy: str


@attrs.frozen
class PhaseChanged:
    """An epoch or a request moved to ``phase`` (see ``butterfly.coordination.phases``)."""

    scope: str
    key: int
    phase: str


Event = (
    RequestCompleted
    | RequestFailed
    | RequestRetried
    | SessionReplayed
    | WorkerStateChanged
    | PlacementChanged
    | PlanComputed
    | PhaseChanged
)
