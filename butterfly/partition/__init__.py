"""Partitioning: splitting a model's layers into contiguous stages on workers."""

from .service import STRATEGIES as STRATEGIES
from .service import PartitionService as PartitionService
from .uniform import plan_uniform as plan_uniform
