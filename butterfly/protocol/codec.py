"""Encoding and decoding of messages and tensors. Pure functions, no I/O.

Untrusted bytes are decoded only by the typed msgspec decoder below, and a
tensor's declared ``shape × dtype`` is checked against its payload and the size
limit before any array is built on it.
"""

from __future__ import annotations

import math
from typing import Final

import msgspec
import numpy as np

from ..errors import ProtocolError
from .messages import Message, WireTensor

__all__ = [
    "DTYPES",
    "MAX_NDIM",
    "array_from_wire",
    "array_to_wire",
    "decode",
    "encode",
    "encode_parts",
]

#: Wire dtype name → numpy storage dtype. numpy has no bfloat16: it travels as its
#: 16-bit pattern and the torch side reinterprets it.
DTYPES: Final[dict[str, np.dtype[np.generic]]] = {
    name: np.dtype(storage)
    for name, storage in {
        "float64": "<f8",
        "float32": "<f4",
        "float16": "<f2",
        "bfloat16": "<u2",
        "int64": "<i8",
        "int32": "<i4",
        "int16": "<i2",
        "int8": "i1",
        "uint8": "u1",
        "bool": "?",
    }.items()
}
_NAME_OF: Final = {dt: name for name, dt in DTYPES.items() if name != "bfloat16"}

#: More dimensions than this is not a tensor anyone sends on purpose.
MAX_NDIM: Final = 32

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(message: Message) -> bytes:
    """Serialize one message into one frame."""
    return _encoder.encode(message)


#: Tensor payloads at least this large are sent as a separate buffer, never copied into the frame.
SCATTER_THRESHOLD: Final = 64 * 1024
_EMPTY_BIN = b"\xc4\x00"  # msgpack bin8 of length 0


def encode_parts(message: Message) -> tuple[bytes | memoryview, ...]:
    """Serialize one message as buffers whose concatenation is ``encode(message)``.

    A large tensor payload is returned as its own buffer (a view of the tensor's
    memory) instead of being copied into the frame: it is the last field of the last
    field of Activation, Result and Checkpoint, so the frame is ``envelope + bin32 header + data``.
    """
    tensor = getattr(message, "tensor", None)
    if tensor is None or not SCATTER_THRESHOLD <= len(tensor.data) < 1 << 32:
        return (_encoder.encode(message),)
    data = tensor.data
    envelope = _encoder.encode(
        msgspec.structs.replace(
            message, tensor=msgspec.structs.replace(tensor, data=memoryview(b""))
        )
    )
    if not envelope.endswith(_EMPTY_BIN):  # a field appended after the tensor: no shortcut
        return (_encoder.encode(message),)
    return envelope[:-2] + b"\xc6" + len(data).to_bytes(4, "big"), data


def decode(frame: bytes | bytearray | memoryview, *, max_size: int | None = None) -> Message:
    """Parse one frame into a message, or raise :class:`ProtocolError`.

    Tensor payloads in the result are ``memoryview`` slices of ``frame``.
    """
    if max_size is not None and len(frame) > max_size:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds the limit of {max_size} bytes")
    try:
        # Annotated, not cast: msgspec releases differ in whether decode() is typed.
        message: Message = _decoder.decode(frame)
        return message
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed frame ({len(frame)} bytes): {exc}") from exc


def array_to_wire(array: np.ndarray, *, dtype: str | None = None) -> WireTensor:
    """Describe ``array`` for the wire without copying it when it is already C-contiguous.

    ``dtype`` overrides the name derived from the array (used for bfloat16 bit patterns).
    """
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    array = np.ascontiguousarray(array)
    if dtype is None:
        dtype = _NAME_OF.get(array.dtype)
        if dtype is None:
            raise ProtocolError(
                f"dtype {array.dtype} cannot be sent; supported: {', '.join(DTYPES)}"
            )
    elif dtype not in DTYPES:
        raise ProtocolError(f"dtype {dtype!r} cannot be sent; supported: {', '.join(DTYPES)}")
    elif DTYPES[dtype].itemsize != array.dtype.itemsize:
        raise ProtocolError(f"dtype {dtype!r} does not match array storage {array.dtype}")
    data = array.data.cast("B") if array.size else memoryview(b"")
    return WireTensor(dtype=dtype, shape=tuple(int(d) for d in array.shape), data=data)


def array_from_wire(tensor: WireTensor, *, max_bytes: int | None = None) -> np.ndarray:
    """Return a read-only numpy view of ``tensor``'s payload after validating it.

    Raises :class:`ProtocolError` for an unknown dtype, a negative or absurd shape,
    a payload whose length differs from ``prod(shape) * itemsize``, or one above
    ``max_bytes``. For ``bfloat16`` the view has the uint16 storage dtype.
    """
    storage = DTYPES.get(tensor.dtype)
    if storage is None:
        raise ProtocolError(
            f"unknown tensor dtype {tensor.dtype!r}; expected one of {', '.join(DTYPES)}"
        )
    shape = tensor.shape
    if len(shape) > MAX_NDIM:
        raise ProtocolError(f"tensor has {len(shape)} dimensions; at most {MAX_NDIM} are accepted")
    if any(d < 0 for d in shape):
        raise ProtocolError(f"tensor shape {shape} has a negative dimension")
    expected = math.prod(shape) * storage.itemsize
    if max_bytes is not None and expected > max_bytes:
        raise ProtocolError(
            f"tensor {tensor.dtype}{list(shape)} declares {expected} bytes; the limit is {max_bytes}"
        )
    if len(tensor.data) != expected:
        raise ProtocolError(
            f"tensor {tensor.dtype}{list(shape)} needs {expected} bytes of payload, got {len(tensor.data)}"
        )
    array = np.frombuffer(tensor.data, dtype=storage) if expected else np.empty(0, dtype=storage)
    return array.reshape(shape)
