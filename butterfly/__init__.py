"""Butterfly: run a PyTorch model split across several hosts.

>>> from butterfly import Butterfly
>>> with Butterfly.connect(["ws://10.0.0.5:7070", "ws://10.0.0.6:7070"]) as b:
...     y = b.infer(x)
"""

from ._facade import AsyncButterfly as AsyncButterfly
from ._facade import AsyncTaskHandle as AsyncTaskHandle
from ._facade import Butterfly as Butterfly
from ._facade import TaskHandle as TaskHandle
from ._local import LocalCluster as LocalCluster
from .config import ButterflyConfig as ButterflyConfig
from .config import load_config as load_config
from .errors import ApiError as ApiError
from .errors import AuthenticationError as AuthenticationError
from .errors import ButterflyError as ButterflyError
from .errors import ByzantineError as ByzantineError
from .errors import ComputeError as ComputeError
from .errors import ConfigError as ConfigError
from .errors import CoordinationError as CoordinationError
from .errors import FingerprintMismatch as FingerprintMismatch
from .errors import ModelError as ModelError
from .errors import NetworkError as NetworkError
from .errors import PartitionError as PartitionError
from .errors import ProtocolError as ProtocolError
from .errors import QueueFull as QueueFull
from .errors import RequestTimeout as RequestTimeout
from .errors import SchedulingError as SchedulingError
from .hf_compat import AutoDistributedModelForCausalLM as AutoDistributedModelForCausalLM
from .scheduling import TaskStatus as TaskStatus
from .text import Tokenizer as Tokenizer
from .types import ClusterInfo as ClusterInfo
from .types import StageInfo as StageInfo
from .types import WorkerInfo as WorkerInfo
from .types import WorkerState as WorkerState

__version__ = "0.1.0"
