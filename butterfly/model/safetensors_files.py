"""The safetensors files of a model directory, read tensor by tensor (or in row blocks).

Tensors are read with plain file reads into memory of their own, not through a memory
map: mapped file pages count in the worker's resident memory next to the copy a layer
keeps, which doubled its peak. A layer's bytes also stay what its digest was checked on
when a file is rewritten while the worker runs.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import attrs
import torch

from ..errors import ModelError

__all__ = ["CheckpointStatistics", "SafetensorsFiles", "SafetensorsReader", "StoredTensor"]


@attrs.frozen
class CheckpointStatistics:
    """What has been read from a model's safetensors files so far (cumulative)."""

    #: Checkpoint keys, in the order they were read (a key hashed in chunks counts once).
    keys_read: tuple[str, ...]
    #: Bytes read, as stored in the files.
    bytes_read: int


#: safetensors dtype names → torch dtypes.
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@attrs.frozen
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(file: Path) -> dict[str, StoredTensor]:
    """The tensors of a safetensors file: an 8-byte little-endian header length, a JSON
    header of ``{name: {dtype, shape, data_offsets}}``, then the data."""
    with file.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    stored = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        start, stop = entry["data_offsets"]
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key!r} has unsupported dtype {entry['dtype']!r}")
        stored[key] = StoredTensor(
            file, dtype, tuple(entry["shape"]), 8 + size + start, stop - start
        )
    return stored


class SafetensorsFiles:
    """The safetensors files of one directory: which file holds each tensor, read on demand.

    Tensors are read with plain file reads into memory of their own, not through a memory
    map: mapped file pages count in the worker's resident memory next to the copy a layer
    keeps, which doubled its peak. A layer's bytes also stay what its digest was checked
    on when the file is rewritten while the worker runs.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted({directory / name for name in weight_map.values()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ModelError(f"cannot read {str(index)!r}: {exc}") from exc
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise ModelError(
                f"no weights in {str(directory)!r}: expected *.safetensors files "
                "(save_pretrained(..., safe_serialization=True) writes them)"
            )
        self.stored: dict[str, StoredTensor] = {}
        for file in files:
            try:
                self.stored.update(read_header(file))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"cannot open weights file {str(file)!r}: {exc}") from exc
        self._keys_read: list[str] = []
        self._bytes_read = 0

    def statistics(self) -> CheckpointStatistics:
        return CheckpointStatistics(keys_read=tuple(self._keys_read), bytes_read=self._bytes_read)

    @contextlib.contextmanager
    def reading(self) -> Iterator[SafetensorsReader]:
        """Open files as they are needed, close them all at the end."""
        with contextlib.ExitStack() as stack:
            yield SafetensorsReader(self, stack)


class SafetensorsReader:
    def __init__(self, checkpoint: SafetensorsFiles, stack: contextlib.ExitStack) -> None:
        self._checkpoint = checkpoint
        self._stack = stack
        self._handles: dict[Path, io.BufferedReader] = {}

    def _load(self, key: str, start_row: int = 0, rows: int | None = None) -> torch.Tensor:
        """Rows ``[start_row, start_row + rows)`` of a stored tensor (all of it by default),
        read from the file into memory the returned tensor owns."""
        stored = self._checkpoint.stored[key]
        if stored.file not in self._handles:
            self._handles[stored.file] = self._stack.enter_context(stored.file.open("rb"))
        shape = list(stored.shape)
        row_bytes = stored.nbytes // shape[0] if shape and shape[0] else stored.nbytes
        if shape:
            total = shape[0]
            rows = total - start_row if rows is None else min(rows, total - start_row)
            shape[0] = rows
        else:
            rows = 1
        size = rows * row_bytes
        if size == 0:
            return torch.empty(shape, dtype=stored.dtype)
        buffer = bytearray(size)
        f = self._handles[stored.file]
        f.seek(stored.offset + start_row * row_bytes)
        if f.readinto(buffer) != size:
            raise ModelError(f"weights file {str(stored.file)!r} ends inside tensor {key!r}")
        return torch.frombuffer(buffer, dtype=stored.dtype).reshape(shape)

    def _count(self, key: str, tensor: torch.Tensor, first: bool) -> None:
        if first:
            self._checkpoint._keys_read.append(key)
        self._checkpoint._bytes_read += tensor.numel() * tensor.element_size()

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The whole tensor in memory of its own, floating point ones cast to ``dtype``.

        The bytes are read into memory of its own (not a memory map), so that what its
        digest was checked on cannot change when the file is rewritten while the worker runs.
        """
        stored = self._load(key)
        self._count(key, stored, first=True)
        return stored.to(dtype) if stored.is_floating_point() else stored

    def chunks(self, key: str, dtype: torch.dtype, max_bytes: int) -> Iterator[torch.Tensor]:
        """The tensor in row blocks of at most ``max_bytes`` (before the cast), each cast to ``dtype``."""
        shape = self._checkpoint.stored[key].shape
        if len(shape) == 0:
            yield self.read(key, dtype)
            return
        row_numel = 1
        for size in shape[1:]:
            row_numel *= size
        # 8 bytes: the widest element; exactness of the bound does not matter.
        rows = max(1, max_bytes // max(row_numel * 8, 1))
        for start in range(0, max(shape[0], 1), rows):
            tensor = self._load(key, start, rows)
            self._count(key, tensor, first=start == 0)
            yield tensor.to(dtype) if tensor.is_floating_point() else tensor
