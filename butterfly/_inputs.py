"""Turning a caller's array into a wire tensor and the answer back into the caller's kind."""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import torch

from .errors import ApiError, ProtocolError
from .model.tensors import torch_from_wire, torch_to_wire
from .protocol import WireTensor, array_from_wire, array_to_wire
from .protocol.inputs import check_input as check_input

__all__ = [
    "InputKind",
    "apply_attention_mask",
    "check_input",
    "check_timeout",
    "from_wire",
    "to_wire",
    "tokens_as",
]


@attrs.frozen
class InputKind:
    """Enough about the caller's input to answer in the same kind and on the same device."""

    is_torch: bool
    device: torch.device | None = None


def to_wire(x: Any) -> tuple[WireTensor, InputKind]:
    """Copy a numpy array or torch tensor into a wire tensor; ``ApiError`` for anything else.

    The copy lets the caller reuse its buffer as soon as ``submit`` returns.
    """
    if isinstance(x, torch.Tensor):
        if x.is_complex() or x.is_sparse:
            raise ApiError(f"input tensor of dtype {x.dtype} / layout {x.layout} is not supported")
        return torch_to_wire(x.detach().to("cpu", copy=True)), InputKind(
            is_torch=True, device=x.device
        )
    if isinstance(x, np.ndarray):
        try:
            return array_to_wire(np.array(x, copy=True, order="C")), InputKind(is_torch=False)
        except ProtocolError as exc:
            raise ApiError(f"input array: {exc}") from None
    raise ApiError(
        f"input must be a numpy.ndarray or torch.Tensor, got {type(x).__module__}.{type(x).__qualname__}"
    )


def tokens_as(tokens: np.ndarray, kind: InputKind) -> Any:
    """Generated token ids in the caller's kind (int64; on the prompt's device)."""
    if kind.is_torch:
        return torch.from_numpy(np.array(tokens, dtype=np.int64)).to(kind.device or "cpu")
    return np.array(tokens, dtype=np.int64)


def from_wire(tensor: WireTensor, kind: InputKind) -> Any:
    """The result in the caller's kind: a writable numpy array, or a tensor on the input's device.

    A result arrives in a frame buffer of its own, so it is handed over without a copy when
    that buffer is writable (rows split from a micro-batch share it, but never overlap).
    """
    if kind.is_torch:
        return torch_from_wire(tensor, device=kind.device or "cpu", adopt=True)
    if tensor.dtype == "bfloat16":
        # numpy has no bfloat16: the caller gets float32 values (exact: bfloat16 ⊂ float32).
        return torch_from_wire(tensor).float().numpy()
    array = array_from_wire(tensor)
    return array if array.flags.writeable else array.copy()


def check_timeout(timeout: float | None, what: str) -> None:
    """``None`` or a positive number of seconds; ``ApiError`` naming the value otherwise."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ApiError(f"{what} must be a positive number of seconds or None, got {timeout!r}")


def apply_attention_mask(ids: Any, attention_mask: Any) -> Any:
    """``ids`` with the positions that ``attention_mask`` zeroes set to -1 (Butterfly's
    padding), in ``ids``' own kind: the mask a Hugging Face tokenizer returns is accepted
    wherever padded token ids are."""
    if attention_mask is None:
        return ids
    if not isinstance(ids, np.ndarray | torch.Tensor):
        raise ApiError(
            f"input_ids must be a numpy array or torch tensor of token ids, got {type(ids).__name__}"
        )
    if isinstance(attention_mask, torch.Tensor):
        mask = attention_mask.detach().to("cpu").numpy()
    elif isinstance(attention_mask, np.ndarray):
        mask = attention_mask
    else:
        raise ApiError(
            f"attention_mask must be a numpy array or torch tensor, got {type(attention_mask).__name__}"
        )
    if tuple(mask.shape) != tuple(ids.shape):
        raise ApiError(
            f"attention_mask has shape {tuple(mask.shape)}; it must match input_ids' {tuple(ids.shape)}"
        )
    if mask.dtype.kind not in "biu" or not np.isin(mask, (0, 1)).all():
        raise ApiError("attention_mask must hold only 0 (padding) and 1 (token)")
    integer = (
        not ids.is_floating_point() if isinstance(ids, torch.Tensor) else ids.dtype.kind in "iu"
    )
    if not integer:
        raise ApiError(f"attention_mask applies to integer token ids, got dtype {ids.dtype}")
    if isinstance(ids, torch.Tensor):
        keep = torch.from_numpy(mask.astype(bool)).to(ids.device)
        return torch.where(keep, ids.long(), -1)
    return np.where(mask.astype(bool), ids.astype(np.int64, copy=False), -1)
