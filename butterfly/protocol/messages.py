"""The wire messages: one tagged union of frozen msgspec Structs.

Schema evolution rule: fields are only ever *appended*, with defaults, so an older
peer decodes a newer message (``array_like`` encodes fields by position). The one
exception is a message carrying a tensor: the tensor stays its last field (so a large
payload is sent from its own memory, see ``codec.encode_parts``), and a new field before
it bumps :data:`PROTOCOL_VERSION`, which the handshake checks.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "Ack",
    "Activation",
    "ActivationProof",
    "Assign",
    "Assigned",
    "Cancel",
    "Checkpoint",
    "Collect",
    "EndSession",
    "Error",
    "Heartbeat",
    "Hello",
    "InputSpec",
    "LayerProfile",
    "LinkReport",
    "Message",
    "Probe",
    "Result",
    "StageOutput",
    "StageSpec",
    "WireTensor",
]

#: Bumped on any change that an older peer cannot decode.
#: 2: Activation gained ``layer`` and ``compute_s`` (checkpoints and resuming from them),
#: ``session`` and ``position`` (generation with caches kept on the stages).
#: 3: Activation gained ``keep`` (rows leaving a running generation session).
#: 4: Activation and Result gained ``trace`` (where each stage spent the request's time).
#: 5: Activation gained ``report`` (verification: the stage's output goes back to its
#: coordinator, which votes on the replicas' outputs).
PROTOCOL_VERSION = 5


class _Struct(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=False):
    pass


class WireTensor(_Struct, frozen=True):
    """A dense, C-contiguous tensor: ``dtype`` name, ``shape`` and the raw bytes.

    ``data`` decodes as a ``memoryview`` into the received frame (zero-copy).
    """

    dtype: str
    shape: tuple[int, ...]
    data: memoryview


class InputSpec(_Struct, frozen=True):
    """What the first stage accepts: used to reject bad input before it is sent.

    ``trailing`` lists the required sizes of the last dimensions; ``dtype`` is ``""``
    when any dtype is accepted; ``max_ndim`` is 0 when unbounded. ``max_length`` bounds
    the positions along dimension 1 — a sequence's tokens, its cached ones included — to
    the model's context (0: unbounded).
    """

    dtype: str = ""
    min_ndim: int = 1
    max_ndim: int = 0
    trailing: tuple[int, ...] = ()
    max_length: int = 0


class LayerProfile(_Struct, frozen=True):
    """One layer as measured by a worker: ms per request there, weight bytes, output bytes."""

    compute_ms: float
    memory_bytes: int
    output_bytes: int


class StageSpec(_Struct, frozen=True):
    """One stage of a placement: layers ``[start, stop)`` on worker ``node_id``."""

    index: int
    start: int
    stop: int
    node_id: str
    address: str


class Hello(_Struct, tag="hello", frozen=True):
    """First message on every connection, in both directions.

    ``role`` is ``"coordinator"`` (control, inputs and results), ``"link"`` (a worker
    pulling the activations it will compute from its upstream worker), ``"member"``
    (a worker introducing itself to a ``--peers`` worker) or ``"worker"`` (a worker
    answering any of these). Nothing else is decoded from a connection before the
    Hello exchange succeeded, which leaves room for an authentication step here.
    """

    version: int
    node_id: str
    role: str
    model_name: str = ""
    fingerprint: str = ""
    address: str = ""
    num_layers: int = 0
    peers: tuple[str, ...] = ()
    input_spec: InputSpec | None = None
    #: Per-layer measurements on this worker (empty when it could not measure).
    layers: tuple[LayerProfile, ...] = ()
    #: Bytes of memory free for weights on this worker's device.
    memory_available: int = 0
    #: Seconds between the heartbeats this side sends (the other side expects that pace).
    heartbeat_interval: float = 0.0
    #: Token ids that end a generation by default (the model's EOS tokens).
    eos_token_ids: tuple[int, ...] = ()


class LinkReport(_Struct, frozen=True):
    """A link measured by the reporting worker: how fast ``source`` (an address) sends to it."""

    source: str
    bandwidth_bytes_per_s: float
    latency_s: float


class Heartbeat(_Struct, tag="heartbeat", frozen=True):
    seq: int


class Ack(_Struct, tag="ack", frozen=True):
    """Answers a Heartbeat or Probe with the same ``seq``; ``peers`` are the workers the
    answering worker knows, so a coordinator learns of workers that joined after it connected.
    ``payload`` is what a Probe's ``reply_bytes`` asked for; ``links`` are the worker's
    measured links from other workers (sent when they changed); ``kv_cache_bytes`` the
    generation state the worker holds."""

    seq: int
    peers: tuple[str, ...] = ()
    payload: bytes = b""
    links: tuple[LinkReport, ...] = ()
    kv_cache_bytes: int = 0


class Probe(_Struct, tag="probe", frozen=True):
    """Answered with ``Ack(seq)``; ``payload`` measures the link's bandwidth towards the
    answering side, ``reply_bytes`` (that many bytes in the Ack) the other direction."""

    seq: int
    payload: bytes = b""
    reply_bytes: int = 0


class Assign(_Struct, tag="assign", frozen=True):
    """The coordinator's placement for ``epoch``: every stage, so each worker knows its neighbours."""

    epoch: int
    stages: tuple[StageSpec, ...]
    #: Seconds of compute after which a request's activation is also sent back to its
    #: coordinator as a :class:`Checkpoint` (0: never).
    checkpoint_interval: float = 0.0
    #: Further holders of stages (``index`` names the stage) that run a request's stage
    #: only when the coordinator verifies it (``Activation.report``).
    replicas: tuple[StageSpec, ...] = ()
    #: What a replica reports of its output instead of the output itself: ``"exact"``
    #: (a digest), ``"tolerance"`` (an :class:`ActivationProof` of ``top_k`` values).
    agreement: str = ""
    top_k: int = 0


class Assigned(_Struct, tag="assigned", frozen=True):
    """A worker has loaded its layers and linked to its upstream worker for ``epoch``."""

    epoch: int
    node_id: str


class StageTrace(_Struct, frozen=True):
    """What stage ``stage`` on worker ``node_id`` did with one request: wall-clock times
    (``time.time()``) when it ``received`` the activation and when it was ``done`` (its
    output handed to the next hop), the ``wait_s`` for the device, ``compute_s``, and the
    ``out_bytes`` of its output. Links are timed as the next stage's ``received`` minus this
    ``done``: exact on one host, as good as the hosts' clock synchronisation across hosts."""

    stage: int
    node_id: str
    received: float
    done: float
    wait_s: float
    compute_s: float
    out_bytes: int


class Activation(_Struct, tag="activation", frozen=True):
    """Input of layer ``layer`` (in ``stage``) for request ``request_id``; the last stage
    answers ``origin``. ``layer`` is the stage's first layer except when a request resumes
    from a checkpoint; ``compute_s`` is the compute spent on the request since its last
    checkpoint (or its start).

    ``session`` (0: none) names a generation session of ``origin``: its stages keep state
    between steps (KV caches), and ``tensor`` holds the session's tokens from ``position``
    on. A stage whose cache does not hold exactly ``position`` tokens refuses the step.
    ``keep`` (empty: all) lists the cached rows that stay, in order, before the step: rows
    of finished generations leave; rows beyond them in ``tensor`` join.
    """

    request_id: int
    epoch: int
    stage: int
    origin: str
    layer: int
    compute_s: float
    session: int
    position: int
    keep: tuple[int, ...]
    #: The stages this request went through so far (see :class:`StageTrace`).
    trace: tuple[StageTrace, ...]
    #: Run stage ``stage`` only and answer ``origin`` with a :class:`StageOutput` (the
    #: coordinator votes on the replicas' outputs before the next stage runs).
    report: bool
    tensor: WireTensor


class ActivationProof(_Struct, frozen=True):
    """A compact summary of a stage's output that honest replicas agree on within
    tolerances (see :mod:`butterfly.coordination.verification`): the flat ``indices``
    (int32) and ``values`` (float16) of its ``top_k`` largest magnitudes, the float16
    root mean square of each of up to 64 equal ``blocks`` of its elements, and its
    ``mean`` and ``rms``."""

    dtype: str
    shape: tuple[int, ...]
    indices: bytes
    values: bytes
    blocks: bytes
    mean: float
    rms: float


class StageOutput(_Struct, tag="stage_output", frozen=True):
    """What a replica computed for stage ``stage`` of ``request_id`` (``Activation.report``):
    the output itself (``tensor``; the stage's first holder sends it) or, from the other
    replicas, only its ``digest`` (exact agreement) or ``proof`` (tolerance) while the
    output waits on the replica until a :class:`Collect`."""

    request_id: int
    epoch: int
    stage: int
    digest: bytes
    proof: ActivationProof | None
    trace: tuple[StageTrace, ...]
    tensor: WireTensor | None


class Collect(_Struct, tag="collect", frozen=True):
    """The coordinator wants (``send``) or no longer needs a replica's withheld output."""

    request_id: int
    stage: int
    send: bool


class Checkpoint(_Struct, tag="checkpoint", frozen=True):
    """The input of layer ``layer`` for request ``request_id``, kept by its coordinator so
    that a re-run after a failure resumes there instead of at the first layer."""

    request_id: int
    epoch: int
    layer: int
    tensor: WireTensor


class Result(_Struct, tag="result", frozen=True):
    """Output of the last stage for ``request_id``, with the ``trace`` of every stage."""

    request_id: int
    epoch: int
    trace: tuple[StageTrace, ...]
    tensor: WireTensor


class Error(_Struct, tag="error", frozen=True):
    """A failure; ``request_id`` is -1 when it concerns the connection, not a request.

    ``kind`` is one of the names in :data:`butterfly.errors.ERROR_KINDS`.
    """

    kind: str
    message: str
    request_id: int = -1
    origin: str = ""


class EndSession(_Struct, tag="end_session", frozen=True):
    """Generation session ``session`` of coordinator ``origin`` is over: free its caches."""

    session: int
    origin: str


class Cancel(_Struct, tag="cancel", frozen=True):
    """Drop any remaining work of ``request_id`` issued by coordinator ``origin``."""

    request_id: int
    origin: str = ""


Message = (
    Hello
    | Heartbeat
    | Ack
    | Probe
    | Assign
    | Assigned
    | Activation
    | Result
    | Error
    | Cancel
    | Checkpoint
    | EndSession
    | StageOutput
    | Collect
)
