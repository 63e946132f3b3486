"""GGUF models (``gguf:/path/model.gguf``) as Butterfly layers.

A GGUF file is read by :mod:`.gguf_file` as the ``config.json`` and checkpoint of the same
Llama in Hugging Face's names, so the layers are those of an ``hf:`` Llama
(:class:`~.hf.HuggingFaceModel`): embeddings, one layer per block, norm and LM head. A
worker dequantises only the tensors of the layers it holds, into its ``--dtype``.

*Fingerprint.* A layer's digest is computed from the file's bytes of its tensors (as
stored, quantised), their types and shapes, the worker's dtype and the model's
configuration: no dequantising at start-up, and hosts may keep the file at different
paths. ``build_layers`` dequantises the very bytes it checked against that digest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from .fingerprint import TensorChunks
from .gguf_file import GGUFFile, GGUFTensorReader, parse_gguf_name
from .hf import HuggingFaceModel

__all__ = ["GGUFModel"]


@attrs.define
class GGUFModel(HuggingFaceModel):
    """A GGUF file's Llama as a list of Butterfly layers.

    >>> model = GGUFModel("gguf:/models/smollm2.gguf", dtype=torch.float32)  # doctest: +SKIP
    >>> model.describe().num_layers                                           # doctest: +SKIP
    32
    """

    _file: GGUFFile | None = attrs.field(init=False, default=None)

    def _locate(self) -> Path:
        return parse_gguf_name(self.name)

    def _gguf(self) -> GGUFFile:
        if self._file is None:
            self._file = GGUFFile(self.directory)
        return self._file

    def _raw_config(self) -> dict[str, Any]:
        return self._gguf().config()

    def _open_checkpoint(self) -> GGUFFile:
        return self._gguf()

    def _where(self) -> str:
        return f"the GGUF file {str(self.directory)!r} (its tensors in Hugging Face's names)"

    def _digest_entry(
        self, reader: GGUFTensorReader, name: str, key: str, meta: torch.Tensor
    ) -> TensorChunks:
        return self._stored_entry(name, key, reader.digest(key))

    def _loaded_entry(
        self, reader: GGUFTensorReader, name: str, key: str, tensor: torch.Tensor
    ) -> TensorChunks:
        return self._stored_entry(name, key, reader.digests[key])

    def _stored_entry(self, name: str, key: str, digest: bytes) -> TensorChunks:
        """A tensor as its bytes' digest, its stored type and the dtype it is read into
        (workers reading the same file into different dtypes compute different answers)."""
        stored = self._gguf().stored[key]
        kind = f"{stored.quant}->{self.dtype}"
        return (name, kind, stored.shape, (torch.frombuffer(bytearray(digest), dtype=torch.uint8),))

    def _display_name(self) -> str:
        return f"gguf:{self.directory.name}"

    def _eos_token_ids(self) -> tuple[int, ...]:
        return self._gguf().eos_token_ids()
