"""Events that components emit for the metrics service: one typed union.

Each is emitted by the component where it happens: the API facade and scheduling (a
task's life), partition (plans), coordination (placements, phases, workers, messages),
generation (tokens). Events about a task carry its ``task_id`` and the trio time ``at``
which they happened, so one task's timeline can be put back together
(:meth:`MetricsService.trace`). ``StageComputed`` and ``LinkTransferred`` come from the
timings each worker appends to a request on its way (``protocol.StageTrace``).
"""

from __future__ import annotations

import attrs

__all__ = [
    "BytesTransferred",
    "CacheReported",
    "ConsensusReached",
    "Event",
    "FirstToken",
    "LinkTransferred",
    "MessageReceived",
    "MessageSent",
    "NodeFailure",
    "PartitionCacheHit",
    "PartitionCacheMiss",
    "PartitionComputed",
    "PhaseTransition",
    "PlacementChanged",
    "ReplicasDisagreed",
    "SessionReplayed",
    "StageComputed",
    "TaskCancelled",
    "TaskCompleted",
    "TaskDispatched",
    "TaskDispatching",
    "TaskEnqueued",
    "TaskFailed",
    "TaskRetried",
    "TaskSubmitted",
    "TokenGenerated",
    "WorkerQuarantined",
    "WorkerStateChanged",
]

# -- a task's life (api, scheduling) ---------------------------------------------------


@attrs.frozen
class TaskSubmitted:
    """The caller handed in task ``task_id`` (``rows`` rows along the batch dimension)."""

    task_id: int
    at: float
    rows: int
    priority: int


@attrs.frozen
class TaskEnqueued:
    """Task ``task_id`` waits in the queue, ``queue_depth`` tasks long with it."""

    task_id: int
    at: float
    queue_depth: int


@attrs.frozen
class TaskDispatching:
    """The dispatcher took task ``task_id`` from the queue into a batch of ``batch_tasks``."""

    task_id: int
    at: float
    batch_tasks: int


@attrs.frozen
class TaskDispatched:
    """Attempt ``attempt`` of task ``task_id`` was sent to the first stage as request
    ``request_id`` on placement ``epoch``, starting at layer ``layer``."""

    task_id: int
    at: float
    request_id: int
    epoch: int
    attempt: int
    layer: int


@attrs.frozen
class TaskRetried:
    """Task ``task_id`` runs again (``attempt`` ≥ 1) after a failure of kind ``reason``,
    from layer ``layer``: 0 from its input, more from a checkpoint."""

    task_id: int
    at: float
    attempt: int
    reason: str
    layer: int


@attrs.frozen
class TaskCompleted:
    """Task ``task_id`` answered after ``latency_s``, computed by ``nodes``."""

    task_id: int
    at: float
    latency_s: float
    rows: int
    nodes: tuple[str, ...]


@attrs.frozen
class TaskFailed:
    task_id: int
    at: float
    kind: str
    message: str


@attrs.frozen
class TaskCancelled:
    task_id: int
    at: float


# -- where the time of one request went (from the workers' timings) --------------------------


@attrs.frozen
class StageComputed:
    """Stage ``stage`` on ``node`` held request ``request_id`` (of ``tasks``, a micro-batch;
    ``task_id`` is the first): it spent ``wait_s`` not computing (queues, the device) and
    ``compute_s`` computing, and sent ``out_bytes``."""

    task_id: int
    at: float
    tasks: tuple[int, ...]
    request_id: int
    stage: int
    node: str
    wait_s: float
    compute_s: float
    out_bytes: int


@attrs.frozen
class LinkTransferred:
    """The activation of ``tasks`` (``task_id`` the first) crossed ``src`` → ``dst`` (node ids; the
    coordinator's own id at either end) in ``seconds`` (wall clocks of two hosts: as
    exact as their synchronisation), ``nbytes`` of tensor."""

    task_id: int
    at: float
    tasks: tuple[int, ...]
    src: str
    dst: str
    seconds: float
    nbytes: int


# -- generation ---------------------------------------------------------------------------------


@attrs.frozen
class FirstToken:
    """A generation's first new tokens (one per row, ``rows``), ``seconds`` after the caller
    asked; ``task_id`` is the step's task."""

    task_id: int
    at: float
    seconds: float
    rows: int


@attrs.frozen
class TokenGenerated:
    """A generation's next tokens (one per row), ``seconds`` after its previous ones."""

    task_id: int
    at: float
    seconds: float
    rows: int


@attrs.frozen
class SessionReplayed:
    """Generation session ``session_id`` resent all its ``tokens``: its stages' caches were
    gone (a lost worker, an eviction, or a new placement)."""

    session_id: int
    tokens: int


# -- partition ------------------------------------------------------------------------------


@attrs.frozen
class PartitionComputed:
    strategy: str
    objective: str
    duration_s: float
    stages: int


@attrs.frozen
class PartitionCacheHit:
    strategy: str


@attrs.frozen
class PartitionCacheMiss:
    strategy: str


# -- coordination -----------------------------------------------------------------------------


@attrs.frozen
class PlacementChanged:
    epoch: int
    stages: int
    planning_s: float


@attrs.frozen
class ConsensusReached:
    """Every worker of placement ``epoch`` confirmed its stages (``Assigned``): the
    cluster agrees on it, and requests may use it. Under verification also once per
    verified stage of a request (``stage`` ≥ 0): ``nodes`` the replicas whose outputs
    agreed, ``rounds`` the exchanges it took (1; 2 when an output had to be collected
    from a replica or a re-execution decided), ``seconds`` from sending the stage's input
    to the accepted output."""

    epoch: int
    nodes: tuple[str, ...]
    seconds: float
    request_id: int = 0
    stage: int = -1
    rounds: int = 1


@attrs.frozen
class ReplicasDisagreed:
    """Replicas of ``stage`` of ``request_id`` gave outputs that do not agree;
    ``agreed`` is False when no quorum was reached (the request failed)."""

    request_id: int
    stage: int
    nodes: tuple[str, ...]
    agreed: bool


@attrs.frozen
class WorkerQuarantined:
    """Worker ``node_id`` contradicted an accepted quorum; ``evidence`` says how."""

    node_id: str
    evidence: str


@attrs.frozen
class PhaseTransition:
    """An epoch or a request moved to ``phase`` (see ``butterfly.coordination.phases``)."""

    scope: str
    key: int
    phase: str


@attrs.frozen
class WorkerStateChanged:
    node_id: str
    state: str


@attrs.frozen
class CacheReported:
    """Worker ``node_id`` holds ``kv_cache_bytes`` of generation state (its heartbeat answer)."""

    node_id: str
    kv_cache_bytes: int


@attrs.frozen
class NodeFailure:
    """Worker ``node_id`` was declared failed: ``reason`` is the kind (``suspected``,
    ``disconnected``), ``evidence`` what was seen (the phi value, the error)."""

    node_id: str
    reason: str
    evidence: str


# -- network (the coordinator's links to its workers) ------------------------------------------


@attrs.frozen
class MessageSent:
    peer: str
    kind: str
    nbytes: int


@attrs.frozen
class MessageReceived:
    peer: str
    kind: str
    nbytes: int


@attrs.frozen
class BytesTransferred:
    """Tensor bytes carried to (``direction`` ``out``) or from (``in``) ``peer``."""

    peer: str
    direction: str
    nbytes: int


Event = (
    TaskSubmitted
    | TaskEnqueued
    | TaskDispatching
    | TaskDispatched
    | TaskRetried
    | TaskCompleted
    | TaskFailed
    | TaskCancelled
    | StageComputed
    | LinkTransferred
    | FirstToken
    | TokenGenerated
    | SessionReplayed
    | PartitionComputed
    | PartitionCacheHit
    | PartitionCacheMiss
    | PlacementChanged
    | ConsensusReached
    | PhaseTransition
    | WorkerStateChanged
    | CacheReported
    | NodeFailure
    | ReplicasDisagreed
    | WorkerQuarantined
    | MessageSent
    | MessageReceived
    | BytesTransferred
)

#: Events about one task (they have ``task_id`` and ``at``): the task's trace.
TASK_EVENTS = (
    TaskSubmitted,
    TaskEnqueued,
    TaskDispatching,
    TaskDispatched,
    TaskRetried,
    TaskCompleted,
    TaskFailed,
    TaskCancelled,
    StageComputed,
    LinkTransferred,
    FirstToken,
    TokenGenerated,
)
