"""What input the first layer of a model accepts, read off the layer itself.

The coordinator checks requests against it before sending anything, so a wrong
shape or dtype is an ``ApiError`` naming both instead of a stage failure.
"""

from __future__ import annotations

from torch import nn

from ..protocol import InputSpec
from .tensors import torch_dtype_name

__all__ = ["infer_input_spec"]


def _first_leaf(module: nn.Module) -> nn.Module:
    while isinstance(module, nn.Sequential) and len(module):
        module = module[0]
    return module


def infer_input_spec(model: nn.Sequential) -> InputSpec:
    """The :class:`InputSpec` of ``model``'s first layer; only the dtype when the layer is unknown."""
    first = _first_leaf(model)
    params = [p for p in first.parameters() if p.is_floating_point()]
    dtype = torch_dtype_name(params[0].dtype) if params else ""
    match first:
        case nn.Linear():
            return InputSpec(dtype=dtype, min_ndim=2, trailing=(first.in_features,))
        case nn.TransformerEncoderLayer() | nn.TransformerDecoderLayer():
            d_model = first.self_attn.embed_dim
            ndim = 3 if first.self_attn.batch_first else 0
            return InputSpec(
                dtype=dtype, min_ndim=3, max_ndim=ndim, trailing=(d_model,) if ndim else ()
            )
        case nn.LayerNorm():
            shape = tuple(first.normalized_shape)
            return InputSpec(dtype=dtype, min_ndim=len(shape) + 1, trailing=shape)
        case nn.Embedding():
            return InputSpec(dtype="", min_ndim=1)
        case nn.Conv1d() | nn.Conv2d() | nn.Conv3d():
            ndim = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}[type(first)]
            return InputSpec(dtype=dtype, min_ndim=ndim, max_ndim=ndim)
        case _:
            return InputSpec(dtype=dtype, min_ndim=1)
