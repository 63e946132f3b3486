"""Micro-batching, sans-IO: which requests can share a forward, and how rows go back to callers."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from ..errors import ProtocolError
from ..protocol import WireTensor, array_from_wire, array_to_wire

__all__ = ["batch_key", "concat", "split"]


def batch_key(tensor: WireTensor) -> tuple[str, tuple[int, ...]]:
    """Requests can be concatenated along dimension 0 when dtype and the other dims agree."""
    return tensor.dtype, tuple(tensor.shape[1:])


def concat(tensors: Sequence[WireTensor]) -> WireTensor:
    """One tensor holding every request's rows, in order."""
    if len(tensors) == 1:
        return tensors[0]
    arrays = [array_from_wire(t) for t in tensors]
    return array_to_wire(np.concatenate(arrays, axis=0), dtype=tensors[0].dtype)


def split(tensor: WireTensor, rows: Sequence[int]) -> list[WireTensor]:
    """Cut a batched output back into each request's rows (views, no copy)."""
    if len(rows) == 1:
        return [tensor]
    array = array_from_wire(tensor)
    if not array.ndim or array.shape[0] != sum(rows):
        raise ProtocolError(
            f"batched output has shape {tuple(array.shape)}; expected {sum(rows)} rows for "
            f"requests of {list(rows)} rows (the model must keep the batch dimension first)"
        )
    bounds = itertools.accumulate(rows, initial=0)
    return [array_to_wire(array[a:b], dtype=tensor.dtype) for a, b in itertools.pairwise(bounds)]
