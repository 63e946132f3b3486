"""Hugging Face models as Butterfly layers, read offline from a local directory.

A model named ``hf:/path/to/dir`` is a directory with ``config.json`` and ``*.safetensors``
(what ``save_pretrained(..., safe_serialization=True)`` writes). Nothing is fetched from
anywhere, and ``transformers`` is not needed: ``config.json`` is read by
:mod:`butterfly.model.architecture` and the blocks are :mod:`butterfly.model.blocks`, which
compute what ``transformers``' own modules compute. Supported families (``config.json``'s
``model_type``): ``gpt2`` and ``llama`` decoders, ``bert`` encoders.

Layers (each takes one tensor and returns one tensor)::

    0          embeddings           int64 token ids (batch, seq)      -> packed hidden states
    1 .. L     one transformer block  packed hidden states            -> packed hidden states
    L + 1      decoders: final norm + LM head                         -> logits (batch, seq, vocab)
               encoders: mean pooling over the mask, L2-normalised    -> embeddings (batch, hidden)

*Padding.* Token ids below 0 mark padding: ``[[5, 7, 9], [4, 2, -1]]`` is a batch of a
3-token and a 2-token sequence. The embeddings layer looks those positions up as the
model's ``pad_token_id`` (0 when it has none) and masks them out of attention. Between
layers the mask travels with the activations as one extra channel: a *packed* tensor is
``(batch, seq, hidden + 1)`` whose last channel is 1.0 for real tokens and 0.0 for padding
(exact in every float dtype). Positions are ``0 .. seq-1`` in every row, as in the
``transformers`` forward without ``position_ids``: pad on the right.

*Partial loading.* The whole architecture is built on the ``meta`` device (no memory);
only the tensors of the requested layers are read from the safetensors files and cast to
the configured dtype (float32, float16 or bfloat16). ``describe()`` hashes every layer's
tensors chunk by chunk and drops them; profiles are computed from tensor sizes and a FLOP
estimate, never by running the model.

*Generation.* Inside a session step (:func:`~butterfly.model.sessions.current_step`),
decoder blocks keep their keys and values in the stage's :class:`~butterfly.model.blocks.KVCache`.
"""

from __future__ import annotations

import abc
import contextlib
import io
import json
import statistics
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm  # type: ignore[import-untyped,unused-ignore]

from ..errors import ModelError
from ..protocol import InputSpec, LayerProfile
from .architecture import Architecture, parse_architecture
from .blocks import (
    BertBlock,
    BertEmbeddings,
    GPT2Block,
    KVCache,
    LlamaBlock,
    RMSNorm,
    StepLayout,
    embedding,
)
from .fingerprint import TensorChunks, model_fingerprint, streamed_digest
from .loading import ModelInfo
from .profile import ANALYTIC_MS_PER_PARAM, timed_ms
from .sessions import Step, current_step

if TYPE_CHECKING:
    from .loading import ModelSource

__all__ = [
    "HF_PREFIX",
    "SUPPORTED_DTYPES",
    "CheckpointStatistics",
    "DecoderBlock",
    "EncoderBlock",
    "EncoderEmbedding",
    "HuggingFaceModel",
    "LanguageModelHead",
    "MeanPooling",
    "TokenEmbedding",
    "pack_hidden",
    "unpack_hidden",
]

#: Model names with this prefix are Hugging Face model directories.
HF_PREFIX = "hf:"
SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: Sequence length of the representative request the profiles describe.
PROFILE_TOKENS = 128
#: The largest piece of one tensor that ``describe()`` holds while hashing it.
DIGEST_CHUNK_BYTES = 16 << 20
#: ``config.json`` keys that name where or with what a model was saved, not what it computes.
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version")
#: FLOP rate assumed when the device cannot be measured: what ``profile.py`` assumes
#: (2 FLOPs per parameter in ANALYTIC_MS_PER_PARAM ms), 1 GFLOP/s.
_FALLBACK_FLOPS_PER_MS = 2 / ANALYTIC_MS_PER_PARAM


# -- the tensor that travels between layers ------------------------------------------------


def pack_hidden(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(batch, seq, hidden)`` states and a ``(batch, seq)`` mask as one ``(batch, seq, hidden + 1)``."""
    return torch.cat((hidden, mask.to(hidden.dtype).unsqueeze(-1)), dim=-1)


def unpack_hidden(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The states (contiguous) and the boolean mask of a packed tensor; ``None`` when nothing is padded.

    ``None`` keeps the attention kernels on their mask-free (causal) path, as in the
    ``transformers`` forward of an unpadded batch.
    """
    if packed.ndim != 3 or packed.shape[-1] < 2:
        raise ValueError(
            f"expected packed hidden states (batch, seq, hidden + 1), got shape {tuple(packed.shape)}"
        )
    mask = packed[..., -1] != 0
    return packed[..., :-1].contiguous(), None if bool(mask.all()) else mask


def _token_ids(ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    if ids.ndim != 2 or ids.dtype != torch.int64:
        raise ValueError(
            f"expected int64 token ids (batch, seq), got {ids.dtype} of shape {tuple(ids.shape)}"
        )
    mask = ids >= 0
    return torch.where(mask, ids, torch.full_like(ids, pad_id)), mask


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    """``(1, seq)`` positions ``0 .. seq-1`` of a forward outside a session (pad on the right)."""
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


def _session_layout(step: Step, real: torch.Tensor) -> tuple[KVCache, StepLayout]:
    """The session's cache on this stage (made at its first step) and this step's layout."""
    cache = step.state.get("kv")
    if cache is None:
        cache = step.state["kv"] = KVCache()
    assert isinstance(cache, KVCache)
    return cache, cache.layout(step.position, real)


# -- the layers ------------------------------------------------------------------------------


class _Layer(nn.Module, abc.ABC):
    """A Butterfly layer of a Hugging Face model, with what the planner needs to know."""

    @abc.abstractmethod
    def flops(self, tokens: int) -> float:
        """Floating-point operations for one sequence of ``tokens`` tokens."""

    @abc.abstractmethod
    def output_numel(self, tokens: int) -> int:
        """Elements of the output for one sequence of ``tokens`` tokens."""


def _matmul_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.ndim >= 2)


def _block_flops(block: nn.Module, arch: Architecture, tokens: int) -> float:
    """Projections and MLP (2 per weight per token), plus the attention scores and sums."""
    width = arch.num_heads * arch.head_dim
    return float(2 * tokens * _matmul_params(block) + 4 * tokens * tokens * width)


class TokenEmbedding(_Layer):
    """Decoder layer 0: token (plus learned position) embeddings, packed with the padding mask."""

    def __init__(self, arch: Architecture, *, learned_positions: bool) -> None:
        super().__init__()
        self.tokens = embedding(arch.vocab_size, arch.hidden_size)
        self.positions = (
            embedding(arch.max_positions, arch.hidden_size) if learned_positions else None
        )
        self.pad_id = arch.pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids, mask = _token_ids(ids, self.pad_id)
        hidden = self.tokens(ids)
        if self.positions is not None:
            step = current_step()
            if step is None:
                positions = _positions(hidden)
            else:
                positions = _session_layout(step, mask)[1].positions
            if positions.numel() and int(positions.max()) >= self.positions.num_embeddings:
                raise ValueError(
                    f"token position {int(positions.max())} is beyond the model's "
                    f"{self.positions.num_embeddings} positions (its context length)"
                )
            hidden = hidden + self.positions(positions)
        return pack_hidden(hidden, mask)

    def flops(self, tokens: int) -> float:
        return float(tokens * self.tokens.embedding_dim)

    def output_numel(self, tokens: int) -> int:
        return tokens * (self.tokens.embedding_dim + 1)


class EncoderEmbedding(_Layer):
    """Encoder layer 0: BERT's embeddings (words, positions, token type, norm), packed."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(arch)
        self.hidden_size = arch.hidden_size
        self.pad_id = arch.pad_id

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids, mask = _token_ids(ids, self.pad_id)
        return pack_hidden(self.embeddings(ids), mask)

    def flops(self, tokens: int) -> float:
        return float(8 * tokens * self.hidden_size)

    def output_numel(self, tokens: int) -> int:
        return tokens * (self.hidden_size + 1)


class DecoderBlock(_Layer):
    """One causal decoder block (GPT-2 or Llama) on packed hidden states.

    Outside a generation session it runs over the whole sequence, padding masked out of
    attention. In a session (:func:`~butterfly.model.sessions.current_step`), keys and
    values of earlier steps come from the stage's :class:`KVCache` in ``step.state``,
    shared by the stage's blocks, and this step's are added to it; rows may be padded
    anywhere (see :class:`KVCache`).
    """

    def __init__(self, block: GPT2Block | LlamaBlock, arch: Architecture) -> None:
        super().__init__()
        self.block = block
        self.arch = arch

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        step = current_step()
        if step is None:
            hidden, mask = unpack_hidden(packed)
            out = self.block(hidden, _causal_mask(mask), _positions(hidden), None)
        else:
            # The stage's layout (mask, positions) is made once per step, by its first layer.
            cache, layout = _session_layout(step, packed[..., -1] != 0)
            out = self.block(packed[..., :-1], layout.mask, layout.positions, cache)
        return torch.cat((out, packed[..., -1:]), dim=-1)

    def flops(self, tokens: int) -> float:
        return _block_flops(self.block, self.arch, tokens)

    def output_numel(self, tokens: int) -> int:
        return tokens * (self.arch.hidden_size + 1)


def _causal_mask(padding: torch.Tensor | None) -> torch.Tensor | None:
    """``(batch, 1, seq, seq)``: a token attends to earlier real tokens; ``None`` without padding."""
    if padding is None:
        return None
    seq = padding.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=padding.device).tril()
    return causal[None, None] & padding[:, None, None, :]


class EncoderBlock(_Layer):
    """One bidirectional encoder block (BERT) on packed hidden states."""

    def __init__(self, block: BertBlock, arch: Architecture) -> None:
        super().__init__()
        self.block = block
        self.arch = arch

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        hidden, mask = unpack_hidden(packed)
        seq = hidden.shape[1]
        attend = None if mask is None else mask[:, None, None, :].expand(-1, 1, seq, seq)
        return torch.cat((self.block(hidden, attend), packed[..., -1:]), dim=-1)

    def flops(self, tokens: int) -> float:
        return _block_flops(self.block, self.arch, tokens)

    def output_numel(self, tokens: int) -> int:
        return tokens * (self.arch.hidden_size + 1)


class LanguageModelHead(_Layer):
    """Decoder last layer: final norm and LM head; logits for every position ``(batch, seq, vocab)``."""

    def __init__(self, norm: nn.Module, arch: Architecture) -> None:
        super().__init__()
        self.norm = norm
        self.head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        hidden, _ = unpack_hidden(packed)
        if current_step() is not None:
            # Generation needs each row's next token only: the logits of its last real
            # token (rows whose step is shorter than the others' are padded on the right).
            real = (packed[..., -1] != 0).to(torch.int64)
            last = real.cumsum(dim=1).argmax(dim=1)
            hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last][:, None]
        logits: torch.Tensor = self.head(self.norm(hidden))
        return logits

    def flops(self, tokens: int) -> float:
        return float(2 * tokens * self.head.in_features * self.head.out_features)

    def output_numel(self, tokens: int) -> int:
        return tokens * self.head.out_features


class MeanPooling(_Layer):
    """Encoder last layer: the mean of the unpadded token states, L2-normalised ``(batch, hidden)``.

    The same arithmetic as sentence-transformers' ``Pooling(pooling_mode="mean")`` followed
    by ``Normalize()`` (half precision sums in float32), as in all-MiniLM-L6-v2.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        hidden, _ = unpack_hidden(packed)
        mask = packed[..., -1:]
        acc = torch.float32 if hidden.dtype in (torch.float16, torch.bfloat16) else hidden.dtype
        summed = (hidden * mask).sum(dim=1, dtype=acc)
        count = torch.clamp(mask.sum(dim=1, dtype=acc), min=1e-9)
        return F.normalize((summed / count).to(hidden.dtype), p=2, dim=-1)

    def flops(self, tokens: int) -> float:
        return float(2 * tokens * self.hidden_size)

    def output_numel(self, tokens: int) -> int:
        return self.hidden_size


# -- model families ---------------------------------------------------------------------------


@attrs.frozen
class _LayerPlan:
    """One layer on the meta device, and where its submodules' tensors are in the checkpoint.

    ``sources`` maps a submodule name of ``layer`` to its prefix in the checkpoint:
    ``{"block": "transformer.h.3"}`` makes ``block.ln_1.weight`` the checkpoint's
    ``transformer.h.3.ln_1.weight``.
    """

    layer: _Layer
    sources: dict[str, str]

    def model_keys(self) -> dict[str, str]:
        """Layer state-dict name → model state-dict name, for every tensor the layer stores."""
        keys = {}
        for name in self.layer.state_dict(keep_vars=True):
            head, _, rest = name.partition(".")
            keys[name] = f"{self.sources[head]}.{rest}"
        return keys


@attrs.frozen
class _Family:
    #: Prefix of the base model's keys in checkpoints of its task models (``bert.``, ``model.``).
    base_prefix: str
    layers: Callable[[Architecture], list[_LayerPlan]]
    #: The LM head's key, and the embedding it is read from when the weights are tied.
    tied_head: tuple[str, str] | None = None
    encoder: bool = False


def _gpt2_layers(arch: Architecture) -> list[_LayerPlan]:
    return [
        _LayerPlan(
            TokenEmbedding(arch, learned_positions=True),
            {"tokens": "transformer.wte", "positions": "transformer.wpe"},
        ),
        *(
            _LayerPlan(DecoderBlock(GPT2Block(arch, i), arch), {"block": f"transformer.h.{i}"})
            for i in range(arch.num_layers)
        ),
        _LayerPlan(
            LanguageModelHead(nn.LayerNorm(arch.hidden_size, eps=arch.norm_eps), arch),
            {"norm": "transformer.ln_f", "head": "lm_head"},
        ),
    ]


def _llama_layers(arch: Architecture) -> list[_LayerPlan]:
    return [
        _LayerPlan(TokenEmbedding(arch, learned_positions=False), {"tokens": "model.embed_tokens"}),
        *(
            _LayerPlan(DecoderBlock(LlamaBlock(arch, i), arch), {"block": f"model.layers.{i}"})
            for i in range(arch.num_layers)
        ),
        _LayerPlan(
            LanguageModelHead(RMSNorm(arch.hidden_size, arch.norm_eps), arch),
            {"norm": "model.norm", "head": "lm_head"},
        ),
    ]


def _bert_layers(arch: Architecture) -> list[_LayerPlan]:
    return [
        _LayerPlan(EncoderEmbedding(arch), {"embeddings": "embeddings"}),
        *(
            _LayerPlan(EncoderBlock(BertBlock(arch), arch), {"block": f"encoder.layer.{i}"})
            for i in range(arch.num_layers)
        ),
        _LayerPlan(MeanPooling(arch.hidden_size), {}),
    ]


FAMILIES: dict[str, _Family] = {
    "gpt2": _Family(
        "transformer", _gpt2_layers, tied_head=("lm_head.weight", "transformer.wte.weight")
    ),
    "llama": _Family(
        "model", _llama_layers, tied_head=("lm_head.weight", "model.embed_tokens.weight")
    ),
    "bert": _Family("bert", _bert_layers, encoder=True),
}


# -- the checkpoint ------------------------------------------------------------------------


@attrs.frozen
class CheckpointStatistics:
    """What has been read from a model's safetensors files so far (cumulative)."""

    #: Checkpoint keys, in the order they were read (a key hashed in chunks counts once).
    keys_read: tuple[str, ...]
    #: Bytes read, as stored in the files.
    bytes_read: int


#: safetensors dtype names → torch dtypes.
_SAFETENSORS_DTYPES = {
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
class _Stored:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _read_header(file: Path) -> dict[str, _Stored]:
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
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key!r} has unsupported dtype {entry['dtype']!r}")
        stored[key] = _Stored(file, dtype, tuple(entry["shape"]), 8 + size + start, stop - start)
    return stored


class _Checkpoint:
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
        self.stored: dict[str, _Stored] = {}
        for file in files:
            try:
                self.stored.update(_read_header(file))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"cannot open weights file {str(file)!r}: {exc}") from exc
        self._keys_read: list[str] = []
        self._bytes_read = 0

    def statistics(self) -> CheckpointStatistics:
        return CheckpointStatistics(keys_read=tuple(self._keys_read), bytes_read=self._bytes_read)

    @contextlib.contextmanager
    def reading(self) -> Iterator[_Reader]:
        """Open files as they are needed, close them all at the end."""
        with contextlib.ExitStack() as stack:
            yield _Reader(self, stack)


class _Reader:
    def __init__(self, checkpoint: _Checkpoint, stack: contextlib.ExitStack) -> None:
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


def _layer_digest(entries: Iterable[TensorChunks], config: bytes) -> str:
    """A layer's digest: its tensors, then the model's configuration, which changes the
    answers as much as the weights do."""
    return streamed_digest(entries, b"config|" + config)


# -- the model ------------------------------------------------------------------------------


def parse_hf_name(name: str) -> Path:
    """The directory of ``hf:/path/to/dir`` (``~`` expanded); ``ModelError`` when it is not one."""
    if not name.startswith(HF_PREFIX) or not name[len(HF_PREFIX) :]:
        raise ModelError(f"model {name!r} is not a Hugging Face model; expected 'hf:/path/to/dir'")
    directory = Path(name[len(HF_PREFIX) :]).expanduser()
    if not directory.is_dir():
        raise ModelError(
            f"model {name!r}: {str(directory)!r} is not a directory; expected a directory "
            "with config.json and *.safetensors"
        )
    if not (directory / "config.json").is_file():
        raise ModelError(
            f"model {name!r}: {str(directory)!r} has no config.json; expected a directory "
            "written by save_pretrained (config.json and *.safetensors)"
        )
    return directory


@attrs.define
class HuggingFaceModel:
    """A Hugging Face model directory as a list of Butterfly layers.

    >>> model = HuggingFaceModel("hf:/models/gpt2", dtype=torch.float16)   # doctest: +SKIP
    >>> model.describe().num_layers                                        # doctest: +SKIP
    14
    >>> stage = model.build_layers(1, 7)         # reads blocks 0..5 only  # doctest: +SKIP
    """

    name: str
    dtype: torch.dtype = torch.float32
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    #: Compute per-layer profiles in ``describe()`` (analytic; no forward pass).
    profile: bool = True
    directory: Path = attrs.field(init=False)
    _config: Architecture | None = attrs.field(init=False, default=None)
    _config_bytes: bytes = attrs.field(init=False, default=b"")
    _family: _Family | None = attrs.field(init=False, default=None)
    _checkpoint: _Checkpoint | None = attrs.field(init=False, default=None)
    _info: ModelInfo | None = attrs.field(init=False, default=None)

    @classmethod
    def of_source(cls, source: ModelSource) -> HuggingFaceModel:
        """The adapter behind a :class:`ModelSource` named ``hf:...``."""
        if source.weights is not None:
            raise ModelError(
                f"model {source.name!r} reads its weights from its own directory; "
                f"drop weights={str(source.weights)!r}"
            )
        return cls(
            source.name,
            dtype=source.dtype or torch.float32,
            device=source.device,
            profile=source.profile,
        )

    def __attrs_post_init__(self) -> None:
        self.directory = parse_hf_name(self.name)
        if self.dtype not in SUPPORTED_DTYPES.values():
            raise ModelError(
                f"model {self.name!r}: dtype {self.dtype} is not supported; "
                f"expected one of {', '.join(SUPPORTED_DTYPES)}"
            )

    # -- configuration -----------------------------------------------------------------

    def _load_config(self) -> tuple[Architecture, _Family]:
        """What ``config.json`` says the model computes, and its family."""
        if self._config is not None and self._family is not None:
            return self._config, self._family
        path = self.directory / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {str(path)!r}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelError(f"{str(path)!r} is not a JSON object")
        model_type = raw.get("model_type")
        family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
        if family is None:
            raise ModelError(
                f"model {self.name!r} has model_type {model_type!r} in config.json; "
                f"supported: {', '.join(sorted(FAMILIES))}"
            )
        arch = parse_architecture(raw, f"model {self.name!r}: config.json")
        if family.encoder:
            self._check_pooling()
        canonical = {k: v for k, v in raw.items() if k not in _PROVENANCE_KEYS}
        self._config_bytes = json.dumps(canonical, sort_keys=True).encode()
        self._config, self._family = arch, family
        return arch, family

    def _check_pooling(self) -> None:
        """A sentence-transformers directory must ask for what :class:`MeanPooling` does."""
        modules_path = self.directory / "modules.json"
        if not modules_path.is_file():
            return
        try:
            modules = json.loads(modules_path.read_text(encoding="utf-8"))
            kinds = {str(m["type"]).rsplit(".", 1)[-1]: str(m.get("path", "")) for m in modules}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"cannot read {str(modules_path)!r}: {exc}") from exc
        modes: dict[str, Any] = {}
        if "Pooling" in kinds:
            pooling_path = self.directory / kinds["Pooling"] / "config.json"
            try:
                modes = json.loads(pooling_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot read {str(pooling_path)!r}: {exc}") from exc
        active = sorted(k for k, v in modes.items() if k.startswith("pooling_mode") and v is True)
        if (
            "Pooling" not in kinds
            or active != ["pooling_mode_mean_tokens"]
            or "Normalize" not in kinds
        ):
            raise ModelError(
                f"model {self.name!r} is a sentence-transformers model with modules "
                f"{sorted(kinds)} and pooling {active or 'none'}; only mean pooling followed by "
                "Normalize is supported"
            )

    def _reader_source(self) -> _Checkpoint:
        if self._checkpoint is None:
            self._checkpoint = _Checkpoint(self.directory)
        return self._checkpoint

    def statistics(self) -> CheckpointStatistics:
        """What has been read from the safetensors files (for tests and memory accounting)."""
        return self._reader_source().statistics()

    def _plans(self) -> list[_LayerPlan]:
        """The whole model's layers on the meta device (no memory)."""
        arch, family = self._load_config()
        with torch.device("meta"):
            return family.layers(arch)

    def _checkpoint_keys(self, plan: _LayerPlan) -> dict[str, str]:
        """Layer state-dict name → checkpoint key; ``ModelError`` naming a tensor that is missing."""
        arch, family = self._load_config()
        checkpoint = self._reader_source()
        tied = dict([family.tied_head]) if family.tied_head and arch.tie_word_embeddings else {}
        prefix = family.base_prefix + "."
        state = plan.layer.state_dict(keep_vars=True)
        keys = {}
        for name, model_key in plan.model_keys().items():
            key = tied.get(model_key, model_key)
            candidates = [key, key[len(prefix) :] if key.startswith(prefix) else prefix + key]
            # Old checkpoints name LayerNorm parameters gamma and beta.
            for candidate in list(candidates):
                for new, old in ((".weight", ".gamma"), (".bias", ".beta")):
                    if candidate.endswith(new):
                        candidates.append(candidate[: -len(new)] + old)
            found = next((c for c in candidates if c in checkpoint.stored), None)
            if found is None:
                raise ModelError(
                    f"model {self.name!r}: the safetensors files in {str(self.directory)!r} have no "
                    f"tensor {model_key!r} (tried {', '.join(repr(c) for c in candidates)})"
                )
            expected = tuple(state[name].shape)
            if checkpoint.stored[found].shape != expected:
                raise ModelError(
                    f"model {self.name!r}: tensor {found!r} has shape {checkpoint.stored[found].shape}, "
                    f"but config.json makes it {expected}"
                )
            keys[name] = found
        return keys

    # -- what ModelSource asks --------------------------------------------------------

    def describe(self) -> ModelInfo:
        """Layer count, per-layer digests (streamed from the files), input spec, analytic profiles."""
        if self._info is not None:
            return self._info
        checkpoint = self._reader_source()
        plans = self._plans()
        digests = []
        for plan in plans:
            # Files are opened per layer and closed once it is hashed.
            with checkpoint.reading() as reader:
                keys = self._checkpoint_keys(plan)
                state = plan.layer.state_dict(keep_vars=True)
                entries = (
                    (
                        name,
                        self.dtype if state[name].is_floating_point() else state[name].dtype,
                        checkpoint.stored[keys[name]].shape,
                        reader.chunks(keys[name], self.dtype, DIGEST_CHUNK_BYTES),
                    )
                    for name in sorted(keys)
                )
                digests.append(_layer_digest(entries, self._config_bytes))
        info = ModelInfo(
            # The directory's name, not its path: workers on different hosts keep the model
            # in different places; the fingerprint is what proves they hold the same weights.
            name=f"hf:{self.directory.name}",
            num_layers=len(plans),
            fingerprint=model_fingerprint(digests),
            layer_digests=tuple(digests),
            input_spec=InputSpec(dtype="int64", min_ndim=2, max_ndim=2),
            profiles=tuple(self._profiles(plans)) if self.profile else (),
        )
        self._info = info
        return info

    def _profiles(self, plans: list[_LayerPlan]) -> list[LayerProfile]:
        arch, _ = self._load_config()
        tokens = min(PROFILE_TOKENS, arch.max_positions)
        rate = _flops_per_ms(self.device, self.dtype, arch.hidden_size, tokens)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        profiles = []
        for plan in plans:
            # What build_layers holds: stored tensors in the configured dtype, derived
            # buffers (rotary frequencies, position ids) in their own.
            stored = plan.layer.state_dict(keep_vars=True).values()
            derived = [
                b
                for m in plan.layer.modules()
                for n, b in m.named_buffers(recurse=False)
                if n in m._non_persistent_buffers_set
            ]
            memory = sum(
                t.numel() * (itemsize if t.is_floating_point() else t.element_size())
                for t in stored
            )
            memory += sum(b.numel() * b.element_size() for b in derived)
            profiles.append(
                LayerProfile(
                    compute_ms=plan.layer.flops(tokens) / rate,
                    memory_bytes=memory,
                    output_bytes=plan.layer.output_numel(tokens) * itemsize,
                )
            )
        return profiles

    def build_layers(self, start: int, stop: int) -> nn.Sequential:
        """Layers ``[start, stop)`` (a range :class:`ModelSource` checked) on the device in eval
        mode; only their tensors are read."""
        info = self.describe()
        selected = self._plans()[start:stop]
        checkpoint = self._reader_source()
        loaded: dict[str, torch.Tensor] = {}  # one copy of a tensor two layers share (tied)
        # A progress bar on the worker's terminal; silent when stderr is not a terminal
        # (a log file).
        progress = tqdm(
            selected,
            desc=f"loading layers {start}..{stop - 1}",
            unit="layer",
            disable=None,
            file=sys.stderr,
        )
        with checkpoint.reading() as reader, progress:
            for plan in progress:
                keys = self._checkpoint_keys(plan)
                state = {}
                for name, key in keys.items():
                    if key not in loaded:
                        loaded[key] = reader.read(key, self.dtype)
                    state[name] = loaded[key]
                plan.layer.load_state_dict(state, strict=True, assign=True)
        for offset, plan in enumerate(selected):
            i = start + offset
            meta = [
                n
                for n, t in (*plan.layer.named_parameters(), *plan.layer.named_buffers())
                if t.is_meta
            ]
            if meta:
                raise ModelError(
                    f"model {self.name!r}: layer {i} has tensors that were not loaded: {meta}"
                )
            state = plan.layer.state_dict()
            entries = (
                (n, state[n].dtype, tuple(state[n].shape), (state[n],)) for n in sorted(state)
            )
            if _layer_digest(entries, self._config_bytes) != info.layer_digests[i]:
                raise ModelError(
                    f"model {self.name!r}: layer {i} differs from the one fingerprinted at start-up; "
                    f"were the files in {str(self.directory)!r} changed? Restart the worker."
                )
        layers = nn.Sequential(*(plan.layer for plan in selected))
        layers.requires_grad_(False)
        return layers.to(self.device).eval()


def _flops_per_ms(device: torch.device, dtype: torch.dtype, hidden: int, tokens: int) -> float:
    """This device's matmul rate in ``dtype`` near the model's width: a few ms, no weights needed.

    The width is kept within [256, 1024]: narrower products measure call overhead, wider
    ones take long on a CPU without changing the rate much.
    """
    width = min(max(hidden, 256), 1024)
    try:
        a = torch.randn(tokens, width, device=device).to(dtype)
        b = torch.randn(width, 4 * width, device=device).to(dtype)
        with torch.inference_mode():
            times = [timed_ms(lambda x: torch.matmul(x, b), a, device)[0] for _ in range(4)]
        ms = statistics.median(times[1:])
    except Exception:
        return _FALLBACK_FLOPS_PER_MS
    return 2 * tokens * width * 4 * width / ms if ms > 0 else _FALLBACK_FLOPS_PER_MS
