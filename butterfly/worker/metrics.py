"""A worker's ``/metrics`` and ``/health`` (``python -m butterfly.worker --metrics-listen``).

Everything is read from the worker when scraped (a Prometheus custom collector), so the
data path pays nothing for it. ``/health`` answers 200 while the worker serves a
placement, 503 with a JSON reason while it loads its model or has no assignment.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..metrics.http import Response, Routes

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .service import WorkerService

__all__ = ["health", "routes", "worker_registry"]


class _WorkerCollector(Collector):
    def __init__(self, worker: WorkerService) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        node = w.node_id
        compute = CounterMetricFamily(
            "butterfly_worker_stage_compute_seconds",
            "Seconds this worker computed, per stage it holds (its layers, first-last).",
            labels=["node", "layers"],
        )
        for (start, stop), seconds in sorted(w.stage_seconds.items()):
            compute.add_metric([node, f"{start}-{stop - 1}"], seconds)
        yield compute
        traffic = CounterMetricFamily(
            "butterfly_worker_bytes",
            "Bytes of messages to (out) and from (in) each peer, by its node id.",
            labels=["node", "peer", "direction"],
        )
        for (peer, direction), nbytes in sorted(w.traffic().items()):
            traffic.add_metric([node, peer, direction], nbytes)
        yield traffic
        weights = GaugeMetricFamily(
            "butterfly_worker_weights_bytes",
            "Bytes of weights held, per stage (its layers, first-last).",
            labels=["node", "layers"],
        )
        for (start, stop), nbytes in sorted(w.weights_bytes.items()):
            weights.add_metric([node, f"{start}-{stop - 1}"], nbytes)
        yield weights
        yield _gauge(
            "butterfly_worker_queue_depth",
            "Activations admitted and not yet done.",
            node,
            w.queue_depth(),
        )
        yield _gauge(
            "butterfly_worker_sessions",
            "Generation sessions with state here.",
            node,
            w.sessions.sessions(),
        )
        yield _gauge(
            "butterfly_kv_cache_bytes",
            "Bytes of generation state (KV caches) held.",
            node,
            w.sessions.held_bytes(),
        )
        yield _gauge(
            "butterfly_worker_coordinators", "Coordinators connected.", node, len(w._coordinators)
        )
        yield _per_node(
            CounterMetricFamily,
            "butterfly_worker_computations",
            "Stage computations done.",
            node,
            w.computed,
        )
        yield _per_node(
            CounterMetricFamily,
            "butterfly_worker_dropped",
            "Requests dropped because their coordinator cancelled them.",
            node,
            w.dropped,
        )


def _per_node(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    documentation: str,
    node: str,
    value: float,
) -> Metric:
    family = kind(name, documentation, labels=["node"])
    family.add_metric([node], value)
    return family


def _gauge(name: str, documentation: str, node: str, value: float) -> Metric:
    return _per_node(GaugeMetricFamily, name, documentation, node, value)


def worker_registry(worker: WorkerService) -> CollectorRegistry:
    """The worker's series, and the process's own (resident memory, CPU seconds, open fds)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_WorkerCollector(worker))
    ProcessCollector(registry=registry)
    return registry


def health(worker: WorkerService) -> Response:
    """200 while serving a placement; 503 with the reason otherwise."""
    if worker.info is None or not worker.address:
        return _json(503, {"status": "loading", "reason": f"loading {worker.source.name}"})
    stages = worker.held_stages()
    if not stages:
        return _json(503, {"status": "unassigned", "reason": "no coordinator placed stages here"})
    return _json(
        200,
        {
            "status": "ok",
            "node_id": worker.node_id,
            "address": worker.address,
            "model": worker.info.name,
            "stages": [f"{start}-{stop - 1}" for start, stop in stages],
        },
    )


def routes(worker: WorkerService) -> Routes:
    registry = worker_registry(worker)
    return {
        "/metrics": lambda: (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            generate_latest(registry),
        ),
        "/health": lambda: health(worker),
    }


def _json(status: int, body: dict[str, object]) -> Response:
    return status, "application/json", json.dumps(body).encode() + b"\n"
