"""Partitioning: splitting a model's layers into contiguous stages on workers.

``plan(layers, nodes, strategy, topology=..., objective=...)`` returns the stages;
``estimate_quality`` scores them. See :mod:`.dp` for the optimal strategy.
"""

from .planner import OBJECTIVES as OBJECTIVES
from .planner import PartitionStrategy as PartitionStrategy
from .planner import estimate_quality as estimate_quality
from .planner import plan as plan
from .service import STRATEGIES as STRATEGIES
from .service import PartitionService as PartitionService
from .uniform import plan_uniform as plan_uniform
