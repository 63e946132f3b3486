"""Metrics: the typed events components emit, and the service that turns them into
Prometheus series, a snapshot and per-task traces."""

from . import events as events
from .collector import MetricsService as MetricsService
from .collector import MetricsSink as MetricsSink
from .collector import MetricsSnapshot as MetricsSnapshot
from .events import Event as Event
