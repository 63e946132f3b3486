"""Configuration: one frozen attrs class per component, loaded from TOML with cattrs.

Every field has a documented default, so an empty file is a valid configuration::

    [network]
    max_message_size = 67108864      # bytes; the largest activation frame accepted

    [api]
    request_timeout = 30.0

Unknown keys and values of the wrong type raise :class:`~butterfly.errors.ConfigError`
naming the key, e.g. ``network.max_message_size: expected int, got 'x'``.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import attrs
import cattrs
from attrs import validators as v

from .errors import ConfigError

__all__ = [
    "ApiConfig",
    "ButterflyConfig",
    "CoordinationConfig",
    "GatewayConfig",
    "MetricsConfig",
    "NetworkConfig",
    "PartitionConfig",
    "SchedulingConfig",
    "load_config",
]

_MiB = 1 << 20
_positive = v.gt(0)
_positive_seconds = v.gt(0.0)
_non_negative_seconds = v.ge(0.0)


@attrs.frozen
class ApiConfig:
    """The facade's behaviour towards the caller."""

    #: Seconds a single ``infer`` may take before it fails with ``RequestTimeout``.
    request_timeout: float = attrs.field(default=60.0, validator=_positive_seconds)
    #: Seconds ``connect`` may take to discover the cluster and assign stages.
    connect_timeout: float = attrs.field(default=60.0, validator=_positive_seconds)
    #: Seconds ``close`` waits for in-flight requests before cancelling them.
    drain_timeout: float = attrs.field(default=10.0, validator=_non_negative_seconds)


@attrs.frozen
class GatewayConfig:
    """The HTTP gateway (``python -m butterfly.api``)."""

    #: Largest request body accepted; a larger one is answered 413.
    max_body_bytes: int = attrs.field(default=64 * _MiB, validator=_positive)
    #: The model's id in the OpenAI API (``""``: the cluster's model name, e.g. ``hf:dir``).
    model_id: str = ""
    #: Tasks of ``POST /v1/inference`` whose status and output stay queryable (oldest
    #: finished ones are forgotten first).
    tasks_kept: int = attrs.field(default=1024, validator=_positive)


@attrs.frozen
class SchedulingConfig:
    """How requests are queued, batched and dispatched."""

    #: ``fifo`` (admission order) or ``priority`` (higher first, FIFO within a priority).
    scheduler_type: str = attrs.field(default="fifo", validator=v.in_(["fifo", "priority"]))
    #: With ``priority``: a task that has waited this many seconds runs next whatever its
    #: priority, so no task starves for longer than this (plus the older tasks' dispatch).
    starvation_s: float = attrs.field(default=10.0, validator=_positive_seconds)
    #: Requests waiting or running at once; a submit beyond it raises ``SchedulingError``.
    max_queue_size: int = attrs.field(default=1024, validator=_positive)
    #: Batches travelling through the pipeline at once (keeps every stage busy).
    max_in_flight: int = attrs.field(default=8, validator=_positive)
    #: Rows (along the batch dimension) that requests of the same shape may be merged into.
    #: 1 disables micro-batching (the default: outputs then do not depend on what else ran).
    dispatch_batch_size: int = attrs.field(default=1, validator=_positive)
    #: How long the dispatcher waits for more requests to fill a micro-batch.
    max_batch_wait_ms: float = attrs.field(default=0.0, validator=_non_negative_seconds)
    #: Times a request is re-run on a new placement when a worker it used is lost.
    max_retries: int = attrs.field(default=3, validator=v.ge(0))
    #: Seconds after which an attempt that got no answer, no error and lost no worker is
    #: presumed lost on the way (a dropped message) and run again. The effective timeout
    #: is at least 3× the slowest recent request, and it counts from the attempt's latest
    #: checkpoint (``coordination.checkpoint_interval``): a long request is not re-run.
    attempt_timeout: float = attrs.field(default=30.0, validator=_positive_seconds)


@attrs.frozen
class PartitionConfig:
    """How layers are split into stages (see ``butterfly.partition``)."""

    #: ``topology_aware`` (optimal for the measured cost model), ``load_balanced``
    #: (proportional to speed) or ``uniform`` (equal layer counts, every worker).
    default_strategy: str = attrs.field(
        default="topology_aware", validator=v.in_(["uniform", "load_balanced", "topology_aware"])
    )
    #: ``throughput`` minimises the slowest stage; ``latency`` the sum of the stages.
    objective: str = attrs.field(default="throughput", validator=v.in_(["throughput", "latency"]))


@attrs.frozen
class CoordinationConfig:
    """Liveness of workers: heartbeats judged by a phi-accrual failure detector."""

    #: Seconds between heartbeats on every coordinator→worker link (at most 60: peers
    #: refuse a longer one, which would keep a dead connection from being reaped).
    heartbeat_interval: float = attrs.field(default=1.0, validator=[_positive_seconds, v.le(60.0)])
    #: Suspicion φ at which a worker is declared failed (8: one chance in 10^8 it is alive).
    phi_threshold: float = attrs.field(default=8.0, validator=_positive_seconds)
    #: Heartbeat intervals remembered for the mean and deviation.
    phi_window: int = attrs.field(default=1000, validator=_positive)
    #: Floor of the deviation, in seconds: perfectly regular heartbeats must not make φ jumpy.
    min_std_deviation: float = attrs.field(default=0.1, validator=_positive_seconds)
    #: Seconds of silence beyond the usual interval that raise no suspicion (GC, load bursts).
    acceptable_heartbeat_pause: float = attrs.field(default=3.0, validator=_non_negative_seconds)
    #: Seconds of compute after which a request's activation at the next stage boundary is
    #: also sent back to the coordinator, so a re-run after a failure resumes there instead
    #: of at the input. Costs one extra activation transfer per interval and, on the
    #: coordinator, one activation held per running request. 0 disables checkpoints.
    checkpoint_interval: float = attrs.field(default=10.0, validator=_non_negative_seconds)
    #: Byzantine workers (see docs/verification.md): ``off`` trusts every worker;
    #: ``replicate`` runs each stage on ``2 * max_byzantine + 1`` workers and accepts an
    #: output that ``max_byzantine + 1`` of them agree on; ``spot_check`` runs one and
    #: re-executes a fraction ``spot_check_rate`` of requests on other workers.
    verification: str = attrs.field(
        default="off", validator=v.in_(["off", "replicate", "spot_check"])
    )
    #: Lying workers tolerated at once (f).
    max_byzantine: int = attrs.field(default=1, validator=[v.ge(1), v.le(16)])
    #: ``exact``: replicas agree bit for bit (same kernels and thread counts);
    #: ``tolerance``: their outputs' proofs agree within the documented thresholds.
    agreement: str = attrs.field(default="tolerance", validator=v.in_(["exact", "tolerance"]))
    #: Fraction of requests (and generation sessions) that ``spot_check`` verifies.
    spot_check_rate: float = attrs.field(default=0.1, validator=[v.gt(0.0), v.le(1.0)])
    #: Largest magnitudes a tolerance proof keeps.
    proof_top_k: int = attrs.field(default=128, validator=[v.ge(8), v.le(256)])


@attrs.frozen
class GenerationConfig:
    """Generation sessions: the state (KV caches) each worker keeps for them."""

    #: Bytes of session caches a worker keeps; beyond it the least recently used session's
    #: caches are dropped (its next step rebuilds them by replaying its tokens).
    kv_cache_bytes: int = attrs.field(default=1 << 30, validator=_positive)
    #: Seconds after which an idle session's caches are dropped.
    session_idle_s: float = attrs.field(default=300.0, validator=_positive_seconds)


@attrs.frozen
class NetworkConfig:
    """Websocket links. The trio-websocket defaults (1 MiB, 4 KiB) are too small for tensors."""

    #: Largest frame accepted, in bytes; size it for the largest activation you send.
    max_message_size: int = attrs.field(default=256 * _MiB, validator=_positive)
    #: Bytes read from the socket per call.
    receive_buffer_size: int = attrs.field(default=1 * _MiB, validator=_positive)
    #: Bytes of messages being received, or received and not yet taken by their reader,
    #: across all of a node's connections. A frame that would exceed it closes its
    #: connection (1013, try again later) and what was in flight is re-run elsewhere:
    #: peers cannot make a worker hold a ``max_message_size`` frame on every connection.
    max_buffered_bytes: int = attrs.field(default=1024 * _MiB, validator=_positive)
    #: Messages queued per peer before senders wait (backpressure, bounded memory).
    send_queue_size: int = attrs.field(default=16, validator=_positive)
    #: Seconds to open one connection (TCP + websocket handshake + Hello).
    connect_timeout: float = attrs.field(default=10.0, validator=_positive_seconds)
    #: Attempts to reach a peer before giving up, with exponential backoff between them.
    reconnect_attempts: int = attrs.field(default=5, validator=_positive)
    #: First backoff delay in seconds; doubled after each failed attempt.
    reconnect_initial_delay: float = attrs.field(default=0.1, validator=_positive_seconds)
    #: Largest backoff delay in seconds.
    reconnect_max_delay: float = attrs.field(default=5.0, validator=_positive_seconds)
    #: Connections a worker holds at once (upgrading, handshaking or established); more are
    #: closed as soon as they are accepted.
    max_connections: int = attrs.field(default=256, validator=_positive)
    #: Of those, connections from one source address: one host cannot take every slot.
    max_connections_per_address: int = attrs.field(default=32, validator=_positive)
    #: TLS: this node's certificate chain and private key (PEM). With them a worker serves
    #: ``wss://``; with ``tls_client_auth`` they are also this node's client certificate.
    tls_cert: str = ""
    tls_key: str = ""
    #: CA certificates (PEM) that ``wss://`` servers (and, with ``tls_client_auth``,
    #: clients) must be signed by; empty: the system's trusted CAs.
    tls_ca: str = ""
    #: Mutual TLS: a worker accepts only clients with a certificate signed by ``tls_ca``.
    tls_client_auth: bool = False
    #: File holding the cluster's shared secret (at least 16 bytes; surrounding whitespace
    #: is ignored). Every node proves it to every other before any message is decoded, and
    #: every frame is then authenticated. Empty: ``BUTTERFLY_SECRET``, else no authentication.
    secret_file: str = ""

    def __attrs_post_init__(self) -> None:
        if self.max_buffered_bytes < self.max_message_size:
            raise ValueError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must be at least "
                f"max_message_size ({self.max_message_size}): one whole message must fit"
            )


def _check_listen(value: str) -> None:
    if not value:
        return
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"'listen' must be HOST:PORT (e.g. 127.0.0.1:9200), got {value!r}")


@attrs.frozen
class MetricsConfig:
    """The metrics service (``butterfly/metrics/``)."""

    #: False: components' events are not recorded at all (the snapshot stays empty);
    #: for measuring what metrics cost (``python -m bench.metrics``).
    enabled: bool = True
    #: Latencies kept for percentiles.
    latency_window: int = attrs.field(default=4096, validator=_positive)
    #: Events waiting for the metrics service; beyond it an event is dropped and counted
    #: (``butterfly_events_dropped_total``), never waited for.
    event_queue_size: int = attrs.field(default=10_000, validator=_positive)
    #: Seconds between two summary lines in the log (0: none).
    export_interval_secs: float = attrs.field(default=60.0, validator=_non_negative_seconds)
    #: Tasks whose events are kept for ``Butterfly.trace`` (the most recent ones), and
    #: events kept per task.
    trace_tasks: int = attrs.field(default=1024, validator=_positive)
    trace_events_per_task: int = attrs.field(default=256, validator=_positive)
    #: ``HOST:PORT`` where the client serves its ``/metrics`` (Prometheus text) and
    #: ``/health`` over plain HTTP while it runs; empty: nowhere.
    listen: str = attrs.field(default="", validator=lambda _, __, value: _check_listen(value))


@attrs.frozen
class ButterflyConfig:
    """The whole configuration; each section is optional in TOML."""

    api: ApiConfig = attrs.field(factory=ApiConfig)
    scheduling: SchedulingConfig = attrs.field(factory=SchedulingConfig)
    partition: PartitionConfig = attrs.field(factory=PartitionConfig)
    coordination: CoordinationConfig = attrs.field(factory=CoordinationConfig)
    network: NetworkConfig = attrs.field(factory=NetworkConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    generation: GenerationConfig = attrs.field(factory=GenerationConfig)
    gateway: GatewayConfig = attrs.field(factory=GatewayConfig)


_T = TypeVar("_T")


def _strict(typ: type[_T], accept: tuple[type, ...]) -> Callable[[Any, type], _T]:
    # cattrs would happily turn "5" into 5; a config file with a quoted number is a mistake.
    def hook(value: Any, _: type) -> _T:
        if isinstance(value, bool) and typ is not bool:
            raise TypeError(f"expected {typ.__name__}, got {value!r}")
        if not isinstance(value, accept):
            raise TypeError(f"expected {typ.__name__}, got {value!r}")
        return typ(value)  # type: ignore[call-arg]

    return hook


_converter = cattrs.Converter(forbid_extra_keys=True)
_converter.register_structure_hook(int, _strict(int, (int,)))
_converter.register_structure_hook(float, _strict(float, (int, float)))
_converter.register_structure_hook(str, _strict(str, (str,)))
_converter.register_structure_hook(bool, _strict(bool, (bool,)))


def _describe(exc: BaseException, path: str) -> list[str]:
    """Flatten cattrs' validation tree into ``key.path: reason`` lines."""
    if isinstance(exc, cattrs.ClassValidationError):
        lines: list[str] = []
        for sub in exc.exceptions:
            note = next(
                (
                    n
                    for n in getattr(sub, "__notes__", [])
                    if isinstance(n, cattrs.AttributeValidationNote)
                ),
                None,
            )
            key = f"{path}.{note.name}" if note is not None else path
            lines.extend(_describe(sub, key.lstrip(".")))
        return lines
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        keys = ", ".join(sorted(f"{path}.{k}".lstrip(".") for k in exc.extra_fields))
        return [f"{keys}: unknown key"]
    # attrs validators say "'name' must be ...": lift the name into the key path.
    match = re.match(r"'(\w+)' (must be .*)", str(exc.args[0]) if exc.args else "")
    if match:
        return [f"{path}.{match[1]}".lstrip(".") + f": {match[2]}"]
    return [f"{path or '<root>'}: {exc}"]


def config_from_mapping(data: Mapping[str, Any]) -> ButterflyConfig:
    """Build a config from a mapping shaped like the TOML file; raises ``ConfigError``."""
    try:
        return _converter.structure(dict(data), ButterflyConfig)
    except Exception as exc:
        raise ConfigError("invalid configuration: " + "; ".join(_describe(exc, ""))) from exc


def load_config(
    source: ButterflyConfig | str | os.PathLike[str] | Mapping[str, Any] | None,
) -> ButterflyConfig:
    """Return a :class:`ButterflyConfig` from a config, a TOML file path, a mapping or ``None``."""
    if source is None:
        return ButterflyConfig()
    if isinstance(source, ButterflyConfig):
        return source
    if isinstance(source, Mapping):
        return config_from_mapping(source)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
        try:
            return config_from_mapping(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc.__cause__
    raise ConfigError(
        f"config: expected a ButterflyConfig, a TOML file path or a mapping, got {type(source).__name__}"
    )
