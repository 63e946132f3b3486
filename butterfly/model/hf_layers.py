"""The layers of a Hugging Face model as Butterfly runs them (each takes one tensor, returns one)::

    0          embeddings           int64 token ids (batch, seq)      -> packed hidden states
    1 .. L     one transformer block  packed hidden states            -> packed hidden states
    L + 1      decoders: final norm + LM head                         -> logits (batch, seq, vocab)
               encoders: mean pooling over the mask, L2-normalised    -> embeddings (batch, hidden)

*Padding.* Token ids below 0 mark padding. Between layers the mask travels with the
activations as one extra channel: a *packed* tensor is ``(batch, seq, hidden + 1)`` whose
last channel is 1.0 for real tokens and 0.0 for padding (exact in every float dtype).

*Generation.* Inside a session step (:func:`~butterfly.model.stage_sessions.current_step`),
decoder blocks keep their keys and values in the stage's :class:`~butterfly.model.blocks.KVCache`.

Each layer also says what the planner needs: its FLOPs and output size per token.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import Architecture
from .blocks import BertBlock, BertEmbeddings, GPT2Block, KVCache, LlamaBlock, StepLayout, embedding
from .stage_sessions import Step, current_step

__all__ = [
    "DecoderBlock",
    "EncoderBlock",
    "EncoderEmbedding",
    "HFLayer",
    "LanguageModelHead",
    "MeanPooling",
    "TokenEmbedding",
    "pack_hidden",
    "unpack_hidden",
]


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


class HFLayer(nn.Module, abc.ABC):
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


class TokenEmbedding(HFLayer):
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


class EncoderEmbedding(HFLayer):
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


class DecoderBlock(HFLayer):
    """One causal decoder block (GPT-2 or Llama) on packed hidden states.

    Outside a generation session it runs over the whole sequence, padding masked out of
    attention. In a session (:func:`~butterfly.model.stage_sessions.current_step`), keys and
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


class EncoderBlock(HFLayer):
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


class LanguageModelHead(HFLayer):
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


class MeanPooling(HFLayer):
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
