"""``python -m butterfly top URL ...``: a live view of workers, from their ``/metrics``.

Each URL is a worker's metrics address (``--metrics-listen``). Every ``--interval``
seconds the view scrapes them all and shows, per worker: its state (``/health``), the
stages it holds with their utilisation (compute seconds per second of wall time), its
queue, computations per second, bytes per second to and from each peer, generation
sessions and KV-cache bytes, weights and resident memory. It only reads: it places
nothing and needs no secret, so it can watch a cluster that is serving.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import defaultdict

import attrs
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from .errors import ApiError

__all__ = ["WorkerSample", "render", "scrape", "watch"]

_TIMEOUT_S = 2.0


@attrs.frozen
class WorkerSample:
    """One scrape of one worker."""

    url: str
    at: float
    state: str
    node: str = ""
    #: Compute seconds so far, and weights bytes, per stage (its layers "first-last").
    compute_s: dict[str, float] = attrs.field(factory=dict)
    weights: dict[str, float] = attrs.field(factory=dict)
    #: Bytes so far per (peer node id, "in" | "out").
    traffic: dict[tuple[str, str], float] = attrs.field(factory=dict)
    queue: float = 0.0
    computations: float = 0.0
    sessions: float = 0.0
    kv_cache_bytes: float = 0.0
    resident_bytes: float = 0.0


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(url: str) -> WorkerSample:
    """Read ``url``'s ``/metrics`` and ``/health`` (``url`` without the path)."""
    base = url.rstrip("/").removesuffix("/metrics")
    now = time.monotonic()
    try:
        status, body = _get(base + "/health")
        state = json.loads(body).get("status", "?") if body else str(status)
        status, text = _get(base + "/metrics")
    except (OSError, ValueError) as exc:
        return WorkerSample(url=base, at=now, state=f"unreachable ({exc})")
    if status != 200:
        return WorkerSample(url=base, at=now, state=f"metrics answered {status}")
    node = ""
    compute: dict[str, float] = {}
    weights: dict[str, float] = {}
    traffic: dict[tuple[str, str], float] = {}
    single: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            node = s.labels.get("node", node)
            match s.name:
                case "butterfly_worker_stage_compute_seconds_total":
                    compute[s.labels["layers"]] = s.value
                case "butterfly_worker_weights_bytes":
                    weights[s.labels["layers"]] = s.value
                case "butterfly_worker_bytes_total":
                    traffic[(s.labels["peer"], s.labels["direction"])] = s.value
                case _:
                    single[s.name] = s.value
    return WorkerSample(
        url=base,
        at=now,
        state=state,
        node=node,
        compute_s=compute,
        weights=weights,
        traffic=traffic,
        queue=single["butterfly_worker_queue_depth"],
        computations=single["butterfly_worker_computations_total"],
        sessions=single["butterfly_worker_sessions"],
        kv_cache_bytes=single["butterfly_kv_cache_bytes"],
        resident_bytes=single["process_resident_memory_bytes"],
    )


def render(before: list[WorkerSample], after: list[WorkerSample]) -> Table:
    """A table of the workers; rates are over the time between the two scrapes."""
    table = Table(title="butterfly top", expand=False)
    for column in (
        "worker",
        "state",
        "stages (utilisation)",
        "queue",
        "comp/s",
        "links (MB/s)",
        "sessions / KV",
        "weights / RSS",
    ):
        table.add_column(column)
    for old, new in zip(before, after, strict=True):
        dt = max(new.at - old.at, 1e-9)
        stages = ", ".join(
            f"{layers} ({(seconds - old.compute_s.get(layers, 0.0)) / dt:.0%})"
            for layers, seconds in sorted(new.compute_s.items())
        )
        links = ", ".join(
            f"{'→' if direction == 'out' else '←'}{peer} {(nbytes - old.traffic.get((peer, direction), 0.0)) / dt / 1e6:.2f}"
            for (peer, direction), nbytes in sorted(new.traffic.items())
        )
        table.add_row(
            f"{new.node or '?'}\n{new.url}",
            new.state,
            stages or "-",
            f"{new.queue:.0f}",
            f"{(new.computations - old.computations) / dt:.1f}",
            links or "-",
            f"{new.sessions:.0f} / {_size(new.kv_cache_bytes)}",
            f"{_size(sum(new.weights.values()))} / {_size(new.resident_bytes)}",
        )
    return table


def watch(urls: list[str], *, interval: float, once: bool, console: Console | None = None) -> None:
    """Refresh the table every ``interval`` seconds until interrupted (or once)."""
    if not urls:
        raise ApiError("top needs at least one worker metrics URL (--metrics-listen)")
    if not interval > 0:
        raise ApiError(f"--interval must be a positive number of seconds, got {interval!r}")
    console = console or Console()
    before = [scrape(u) for u in urls]
    if once:
        time.sleep(interval)
        console.print(render(before, [scrape(u) for u in urls]))
        return
    with Live(render(before, before), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            after = [scrape(u) for u in urls]
            live.update(render(before, after))
            before = after


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"
