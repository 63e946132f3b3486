"""Whether a tensor is an input the model accepts: checked by the client before it sends,
and by the worker holding the first layer whatever the client checked."""

from __future__ import annotations

import math

from ..errors import ApiError
from .messages import InputSpec, WireTensor

__all__ = ["check_input"]


def _describe_shape(spec: InputSpec) -> str:
    """E.g. ``(*, ..., 64)``: any leading sizes, any number of middle dims, 64 features."""
    dims = ["*"] * max(spec.min_ndim - len(spec.trailing), 0)
    if not spec.max_ndim:
        dims.append("...")
    dims += [str(d) for d in spec.trailing]
    return "(" + ", ".join(dims) + ")"


def check_input(tensor: WireTensor, spec: InputSpec, *, max_bytes: int) -> None:
    """Raise ``ApiError`` naming expected and received when ``tensor`` does not fit ``spec``."""
    shape = tuple(tensor.shape)
    received = f"shape {shape} and dtype {tensor.dtype}"
    expected = f"shape {_describe_shape(spec)}" + (f" and dtype {spec.dtype}" if spec.dtype else "")
    if not shape:
        raise ApiError(f"input has {received}: a batch-first tensor needs at least one dimension")
    ok_rank = len(shape) >= max(spec.min_ndim, 1) and (
        not spec.max_ndim or len(shape) <= spec.max_ndim
    )
    ok_tail = not spec.trailing or shape[-len(spec.trailing) :] == tuple(spec.trailing)
    ok_dtype = not spec.dtype or tensor.dtype == spec.dtype
    if not (ok_rank and ok_tail and ok_dtype):
        raise ApiError(f"input has {received}; the model expects {expected}")
    if spec.max_length and len(shape) >= 2 and shape[1] > spec.max_length:
        raise ApiError(
            f"input of {shape[1]} positions exceeds the model's context of "
            f"{spec.max_length} positions"
        )
    nbytes = len(tensor.data)
    # Leave room for the message envelope around the payload.
    if nbytes + 1024 > max_bytes:
        raise ApiError(
            f"input of {nbytes} bytes ({math.prod(shape)} elements) exceeds network.max_message_size "
            f"({max_bytes} bytes); raise it on the coordinator and every worker, or split the batch"
        )
