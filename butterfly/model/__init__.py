"""Models: loading from an import path and safetensors or a Hugging Face directory, fingerprints, the stage runtime."""

from .fingerprint import layer_digest as layer_digest
from .fingerprint import model_fingerprint as model_fingerprint
from .hf import HuggingFaceModel as HuggingFaceModel
from .info import ModelInfo as ModelInfo
from .input_spec import infer_input_spec as infer_input_spec
from .loading import ModelSource as ModelSource
from .loading import import_factory as import_factory
from .runtime import StageRuntime as StageRuntime
from .tensors import torch_dtype_name as torch_dtype_name
from .tensors import torch_from_wire as torch_from_wire
from .tensors import torch_to_wire as torch_to_wire
