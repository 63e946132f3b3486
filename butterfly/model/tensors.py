"""Conversions between torch tensors, numpy arrays and wire tensors."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ApiError
from ..protocol import DTYPES, WireTensor, array_from_wire, array_to_wire

__all__ = ["TORCH_DTYPES", "torch_dtype_name", "torch_from_wire", "torch_to_wire"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAME_OF = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def torch_dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; raises ``ApiError`` for one the wire cannot carry."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise ApiError(
            f"tensor dtype {dtype} is not supported; supported: {', '.join(DTYPES)}"
        ) from None


def torch_to_wire(tensor: torch.Tensor) -> WireTensor:
    """Copy ``tensor`` to host memory (if needed) and describe it for the wire."""
    name = torch_dtype_name(tensor.dtype)
    host = tensor.detach().to("cpu").contiguous()
    if name == "bfloat16":
        return array_to_wire(host.view(torch.int16).numpy().view(np.uint16), dtype=name)
    return array_to_wire(host.numpy())


def torch_from_wire(
    tensor: WireTensor,
    *,
    device: torch.device | str = "cpu",
    max_bytes: int | None = None,
    adopt: bool = False,
) -> torch.Tensor:
    """Build a torch tensor on ``device`` from a validated wire tensor.

    The payload is copied, unless ``adopt`` is set and the buffer is writable: then the
    tensor uses the received frame's memory (safe when nothing else holds that frame).
    """
    array = array_from_wire(tensor, max_bytes=max_bytes)
    host = torch.from_numpy(array if adopt and array.flags.writeable else array.copy())
    if tensor.dtype == "bfloat16":
        host = host.view(torch.int16).view(torch.bfloat16)
    return host.to(device)
