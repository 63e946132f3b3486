"""Scheduling: admission, policies, micro-batching, dispatch into the pipeline, routing of results."""

from .policy import FifoPolicy as FifoPolicy
from .policy import PriorityPolicy as PriorityPolicy
from .service import SchedulingService as SchedulingService
from .task import InferenceTask as InferenceTask
from .task import SessionState as SessionState
from .task import TaskStatus as TaskStatus
