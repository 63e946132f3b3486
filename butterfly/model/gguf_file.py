"""A GGUF file (llama.cpp's format) read as a checkpoint of Llama layers.

The file is parsed with ``gguf``, ggml's own Python reader (memory-mapped; only the
header's pages are touched). Its metadata (``llama.*`` keys) becomes the ``config.json``
that :mod:`.architecture` reads, and its tensor names (``blk.3.attn_q.weight``) become the
Hugging Face names the Llama family's layers ask for (``model.layers.3.self_attn.q_proj.weight``),
so :class:`~.gguf.GGUFModel` builds the very blocks an ``hf:`` Llama uses.

Tensor bytes are read with plain file reads, not through the map: mapped pages count in
the worker's resident memory next to the dequantised copy a layer keeps (the same reason
as in :mod:`.safetensors_files`). Each tensor is dequantised with the library's own
dequantiser, then cast to the worker's dtype.

*Rotary order.* llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` within
each head (it interleaves the two rotary halves, ``convert_hf_to_gguf.py``'s ``permute``);
reading undoes that, so the rows are in the order the blocks rotate them.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from ..errors import ModelError
from .safetensors_files import CheckpointStatistics

__all__ = [
    "GGUF_PREFIX",
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_QUANT_TYPES",
    "GGUFFile",
    "GGUFTensor",
    "parse_gguf_name",
]

#: Model names with this prefix are GGUF files.
GGUF_PREFIX = "gguf:"
#: ``general.architecture`` values whose tensors map to Butterfly's blocks.
SUPPORTED_ARCHITECTURES = ("llama",)
#: Tensor types read (and dequantised with ``gguf.quants``); others are refused by name.
SUPPORTED_QUANT_TYPES = (
    "F32",
    "F16",
    "BF16",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
)
#: The largest piece of one tensor's bytes that hashing it holds.
_CHUNK_BYTES = 16 << 20
#: The largest piece that dequantising holds: the dequantiser's float32 intermediates are
#: several times the size of the bytes (measured: 16 MiB pieces cost a worker 60 MiB more
#: peak memory than 2 MiB ones, at no measurable speed).
_DEQUANT_CHUNK_BYTES = 2 << 20
#: The vocabulary's arrays (see ``GGUFFile``).
_VOCABULARY_KEYS = frozenset(
    f"tokenizer.ggml.{k}" for k in ("tokens", "merges", "token_type", "scores")
)
#: GGUF tensor name → Hugging Face Llama name (``{}`` is the block's number).
_BLOCK_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_MODEL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
#: Metadata that changes the arithmetic in ways the Llama blocks do not implement.
_REFUSED_KEYS = {
    "expert_count": "a mixture of experts",
    "attention.sliding_window": "sliding-window attention",
    "attention.clamp_kqv": "clamped q/k/v",
}


def parse_gguf_name(name: str) -> Path:
    """The file of ``gguf:/path/model.gguf`` (``~`` expanded); ``ModelError`` when it is not one."""
    if not name.startswith(GGUF_PREFIX) or not name[len(GGUF_PREFIX) :]:
        raise ModelError(f"model {name!r} is not a GGUF model; expected 'gguf:/path/model.gguf'")
    path = Path(name[len(GGUF_PREFIX) :]).expanduser()
    if not path.is_file():
        raise ModelError(f"model {name!r}: {str(path)!r} is not a file; expected a .gguf file")
    return path


@attrs.frozen
class GGUFTensor:
    """One tensor of the file, in torch's dimension order."""

    #: Its name in the file (``blk.3.attn_q.weight``).
    name: str
    #: ggml's type name (``Q4_1``).
    quant: str
    shape: tuple[int, ...]
    #: Absolute offset of its bytes in the file, and their count.
    offset: int
    nbytes: int
    #: Heads whose rows are in llama.cpp's rotary order (``attn_q``/``attn_k``); 0: none.
    rotary_heads: int = 0


class GGUFFile:
    """The metadata and tensors of one GGUF file; tensors are keyed by their Hugging Face name."""

    def __init__(self, path: Path, *, vocabulary: bool = False) -> None:
        """Parse ``path``'s header; keep the vocabulary's arrays only when ``vocabulary`` is
        true (the tokenizer needs them, a worker does not: the reader holds each of their
        strings as numpy arrays, ~150 MiB for a 49k-token vocabulary)."""
        from gguf import GGUFReader

        self.path = path
        try:
            reader = GGUFReader(path)
        except Exception as exc:  # the reader raises ValueError, struct.error, OSError…
            raise ModelError(f"cannot read GGUF file {str(path)!r}: {exc}") from exc
        self._keys = frozenset(reader.fields)
        self._values: dict[str, Any] = {
            key: field.contents()
            for key, field in reader.fields.items()
            if vocabulary or key not in _VOCABULARY_KEYS
        }
        self.architecture = str(self.value("general.architecture"))
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelError(
                f"GGUF file {str(path)!r}: general.architecture is {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        self._files: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            t.name: (
                t.tensor_type.name,
                tuple(int(d) for d in reversed(t.shape)),
                int(t.data_offset),
                int(t.n_bytes),
            )
            for t in reader.tensors
        }
        del reader  # its fields' arrays, and its map of the file
        _return_freed_memory()
        self.stored = self._map_tensors()
        self._keys_read: list[str] = []
        self._bytes_read = 0

    # -- metadata ------------------------------------------------------------------------

    def has(self, key: str) -> bool:
        return key in self._keys

    def value(self, key: str, default: Any = ...) -> Any:
        """A metadata value (a str, number, bool, or list of them); ``ModelError`` naming the
        key when it is missing and there is no default."""
        if key in self._values:
            return self._values[key]
        if key in self._keys:
            raise RuntimeError(f"{key!r} was not kept: open the file with vocabulary=True")
        if default is ...:
            raise ModelError(f"GGUF file {str(self.path)!r} has no metadata key {key!r}")
        return default

    def _arch(self, key: str, default: Any = ...) -> Any:
        return self.value(f"{self.architecture}.{key}", default)

    def config(self) -> dict[str, Any]:
        """What the metadata says, as the ``config.json`` of the same Llama would say it."""
        where = f"GGUF file {str(self.path)!r}"
        for key, what in _REFUSED_KEYS.items():
            if self._arch(key, 0):
                raise ModelError(
                    f"{where}: {self.architecture}.{key} is {self._arch(key)!r}: {what}, which "
                    "Butterfly's Llama blocks do not implement"
                )
        if "rope_freqs.weight" in self._files:
            raise ModelError(
                f"{where} has tensor 'rope_freqs.weight' (per-frequency rotary factors, as "
                "Llama 3.1+ files carry); Butterfly's Llama blocks take rope scaling from "
                "metadata only: supported rope scaling: none, linear"
            )
        hidden = self._arch("embedding_length")
        heads = self._arch("attention.head_count")
        head_dim = self._arch("attention.key_length", None)
        if head_dim is not None and self._arch("attention.value_length", head_dim) != head_dim:
            raise ModelError(
                f"{where}: {self.architecture}.attention.value_length is "
                f"{self._arch('attention.value_length')!r}; expected the key length {head_dim}"
            )
        rotary = self._arch("rope.dimension_count", None)
        expected_dim = head_dim if head_dim is not None else (hidden // heads if heads else None)
        if rotary is not None and rotary != expected_dim:
            raise ModelError(
                f"{where}: {self.architecture}.rope.dimension_count is {rotary!r}; expected the "
                f"head dimension {expected_dim} (rotation of whole heads)"
            )
        embedding = self._files.get("token_embd.weight")
        if embedding is None:
            raise ModelError(f"{where} has no tensor 'token_embd.weight'")
        rope: dict[str, Any] = {
            "rope_type": "default",
            "rope_theta": self._arch("rope.freq_base", 10000.0),
        }
        scaling = self._arch("rope.scaling.type", "none")
        if scaling == "linear":
            rope |= {"rope_type": "linear", "factor": self._arch("rope.scaling.factor")}
        elif scaling != "none":
            raise ModelError(
                f"{where}: {self.architecture}.rope.scaling.type is {scaling!r}; "
                "supported: none, linear"
            )
        config: dict[str, Any] = {
            "model_type": "llama",
            "vocab_size": self._arch("vocab_size", embedding[1][0]),
            "hidden_size": hidden,
            "num_hidden_layers": self._arch("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": self._arch("attention.head_count_kv", heads),
            "intermediate_size": self._arch("feed_forward_length"),
            "max_position_embeddings": self._arch("context_length", 2048),
            "rms_norm_eps": self._arch("attention.layer_norm_rms_epsilon", 1e-5),
            "hidden_act": "silu",
            "tie_word_embeddings": "output.weight" not in self._files,
            "attention_bias": "blk.0.attn_q.bias" in self._files,
            "mlp_bias": "blk.0.ffn_up.bias" in self._files,
            "rope_parameters": rope,
        }
        if head_dim is not None:
            config["head_dim"] = head_dim
        pad = self.value("tokenizer.ggml.padding_token_id", None)
        if pad is not None:
            config["pad_token_id"] = pad
        return config

    def eos_token_ids(self) -> tuple[int, ...]:
        """The end-of-sequence, end-of-turn and end-of-message tokens the metadata names."""
        ids = []
        for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
            value = self.value(f"tokenizer.ggml.{key}", None)
            if isinstance(value, int) and value >= 0 and value not in ids:
                ids.append(value)
        return tuple(ids)

    # -- tensors -------------------------------------------------------------------------

    def _map_tensors(self) -> dict[str, GGUFTensor]:
        heads = self._arch("attention.head_count", 0)
        kv_heads = self._arch("attention.head_count_kv", heads)
        stored = {}
        for name, (quant, shape, offset, nbytes) in self._files.items():
            rotary = 0
            if name.startswith("blk."):
                _, number, rest = name.split(".", 2)
                hf = _BLOCK_TENSORS.get(rest)
                key = f"model.layers.{number}.{hf}" if hf else None
                kind = rest.partition(".")[0]
                rotary = heads if kind == "attn_q" else kv_heads if kind == "attn_k" else 0
            else:
                key = _MODEL_TENSORS.get(name)
            if key is not None:  # others are not asked for; a missing one is named by the layers
                stored[key] = GGUFTensor(name, quant, shape, offset, nbytes, rotary)
        return stored

    def statistics(self) -> CheckpointStatistics:
        return CheckpointStatistics(keys_read=tuple(self._keys_read), bytes_read=self._bytes_read)

    @contextlib.contextmanager
    def reading(self) -> Iterator[GGUFTensorReader]:
        with self.path.open("rb") as f:
            yield GGUFTensorReader(self, f)


class GGUFTensorReader:
    """Reads tensors of one open file; remembers the digest of each tensor's bytes it read."""

    def __init__(self, file: GGUFFile, handle: io.BufferedReader) -> None:
        self._file = file
        self._handle = handle
        #: Checkpoint key → BLAKE2b of the bytes :meth:`read` dequantised.
        self.digests: dict[str, bytes] = {}

    def _bytes(self, tensor: GGUFTensor, start: int, size: int) -> bytearray:
        buffer = bytearray(size)
        self._handle.seek(tensor.offset + start)
        if self._handle.readinto(buffer) != size:
            raise ModelError(
                f"GGUF file {str(self._file.path)!r} ends inside tensor {tensor.name!r}"
            )
        self._file._bytes_read += size
        return buffer

    def _check_type(self, key: str) -> GGUFTensor:
        tensor = self._file.stored[key]
        if tensor.quant not in SUPPORTED_QUANT_TYPES:
            raise ModelError(
                f"GGUF file {str(self._file.path)!r}: tensor {tensor.name!r} is {tensor.quant}; "
                f"supported types: {', '.join(SUPPORTED_QUANT_TYPES)}"
            )
        return tensor

    def digest(self, key: str) -> bytes:
        """BLAKE2b of the tensor's bytes as stored, read in chunks (never whole in memory)."""
        tensor = self._check_type(key)
        h = hashlib.blake2b(digest_size=16)
        for start in range(0, tensor.nbytes, _CHUNK_BYTES):
            h.update(self._bytes(tensor, start, min(_CHUNK_BYTES, tensor.nbytes - start)))
        self._file._keys_read.append(key)
        return h.digest()

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor dequantised and cast to ``dtype``, rows in the blocks' rotary order.

        Rows are read and dequantised in blocks of at most 2 MiB of bytes, straight into
        the result: the dequantiser's float32 intermediates never hold the whole tensor."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize, quant_shape_to_byte_shape

        tensor = self._check_type(key)
        qtype = GGMLQuantizationType[tensor.quant]
        shape = tensor.shape if len(tensor.shape) > 1 else (1, *tensor.shape)
        values = torch.empty(shape, dtype=dtype)
        row_bytes = tensor.nbytes // shape[0]
        step = max(1, _DEQUANT_CHUNK_BYTES // max(row_bytes, 1))
        digest = hashlib.blake2b(digest_size=16)
        for start in range(0, shape[0], step):
            rows = min(step, shape[0] - start)
            raw = self._bytes(tensor, start * row_bytes, rows * row_bytes)
            digest.update(raw)
            byte_shape = quant_shape_to_byte_shape((rows, *shape[1:]), qtype)
            block = dequantize(np.frombuffer(raw, dtype=np.uint8).reshape(byte_shape), qtype)
            if tuple(block.shape) != (rows, *shape[1:]):  # sizes that contradict each other
                raise ModelError(
                    f"GGUF file {str(self._file.path)!r}: tensor {tensor.name!r} dequantises to "
                    f"rows of {tuple(block.shape[1:])}, expected {shape[1:]}"
                )
            values[start : start + rows] = torch.from_numpy(block)
        self._file._keys_read.append(key)
        self.digests[key] = digest.digest()
        values = values.reshape(tensor.shape)
        return _unpermute_rotary(values, tensor.rotary_heads) if tensor.rotary_heads else values


def _return_freed_memory() -> None:
    """Give the heap's free pages back to the system (glibc keeps them otherwise): the
    reader's many small arrays leave ~50 MiB of them in a worker that holds none of it."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _unpermute_rotary(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo the converter's interleaving of each head's two rotary halves: row ``2j + k`` of a
    head in the file is row ``k * half + j`` of the head in Hugging Face's order."""
    half = rows.shape[0] // heads // 2
    return (
        rows.reshape(heads, half, 2, *rows.shape[1:])
        .transpose(1, 2)
        .reshape(rows.shape)
        .contiguous()
    )
