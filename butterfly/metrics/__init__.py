"""Metrics: event types and the in-process collecting service."""

from .collector import MetricsService as MetricsService
from .collector import MetricsSink as MetricsSink
from .events import Event as Event
from .events import PhaseChanged as PhaseChanged
from .events import PlacementChanged as PlacementChanged
from .events import PlanComputed as PlanComputed
from .events import RequestCompleted as RequestCompleted
from .events import RequestFailed as RequestFailed
from .events import RequestRetried as RequestRetried
from .events import SessionReplayed as SessionReplayed
from .events import WorkerStateChanged as WorkerStateChanged
