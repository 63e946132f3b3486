"""Partitioning: splitting a model's layers into contiguous stages on workers.

``plan(layers, nodes, strategy, topology=..., objective=...)`` returns the stages;
``estimate_quality`` scores them. See :mod:`.dp` for the optimal strategy with one stage
per node, and :mod:`.repeats` for plans where a node holds several stages.
"""

from .planner import OBJECTIVES as OBJECTIVES
from .planner import PartitionStrategy as PartitionStrategy
from .planner import estimate_quality as estimate_quality
from .planner import plan as plan
from .service import PartitionService as PartitionService
from .service import Plan as Plan
from .service import cache_key as cache_key
