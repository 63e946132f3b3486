"""GPT-2, Llama and BERT blocks in plain torch, with the arithmetic of ``transformers``' own.

Each block's submodules carry the names of the checkpoint's tensors (``attn.c_attn.weight``,
``self_attn.q_proj.weight``, ``attention.self.query.weight`` …), so a block loads a
``save_pretrained`` checkpoint's tensors as they are. The operations, their order and the
attention kernel (``scaled_dot_product_attention``, grouped-query attention through its
``enable_gqa`` flag) are those of ``transformers`` 5 with its default
``sdpa`` attention: a split model gives the local model's numbers, bitwise on the same
machine and thread count, which the tests check against ``transformers`` itself.

A block takes hidden states ``(batch, seq, hidden)``, an optional boolean attention mask
``(batch, 1, seq, keys)`` (``True``: may attend), the positions of its tokens, and a
:class:`KVCache` for generation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from .activations import activation

if TYPE_CHECKING:
    from .architecture import Architecture, Rope

__all__ = [
    "BertBlock",
    "BertEmbeddings",
    "GPT2Block",
    "KVCache",
    "LlamaBlock",
    "RMSNorm",
    "StepLayout",
    "attention",
    "embedding",
]


@attrs.frozen
class StepLayout:
    """Where a session step's tokens stand in their rows, and what each may attend to."""

    #: The step's first column in the session (see :class:`~butterfly.model.stage_sessions.Step`).
    position: int
    #: ``(rows, seq)``: each token's position in its own row, counting real tokens only.
    positions: torch.Tensor
    #: ``(rows, 1, seq, cached + seq)`` may-attend mask; ``None`` when no row has padding
    #: (the attention kernel's causal flag then does it, as without a session).
    mask: torch.Tensor | None


class KVCache:
    """A session's state on one stage: per block, keys and values of the earlier columns;
    per row, which columns hold real tokens.

    A session is a rectangle of rows × columns. Padding (negative ids, carried as the
    mask channel) lets rows of different lengths share it: a row that joins a running
    session has padding in the columns before it; a step that brings one row's prompt
    and the other rows' next token pads those on the right. Padded columns are masked
    out of attention and not counted in positions, so each row computes what it would
    compute alone.
    """

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        #: ``(rows, columns)``: True where a column of a row is a real token.
        self.real = torch.zeros(0, 0, dtype=torch.bool)
        #: ``(rows,)``: real tokens of each row so far.
        self.counts = torch.zeros(0, dtype=torch.int64)
        self._layout: StepLayout | None = None

    def layout(self, position: int, real: torch.Tensor) -> StepLayout:
        """The layout of the step at ``position`` whose ``(rows, seq)`` real-token mask is
        ``real``; computed by the stage's first layer, then the same for the others.

        A step may bring more rows than the session had: they join, padded before.
        """
        if self._layout is not None and self._layout.position == position:
            return self._layout
        rows, tokens = real.shape
        held, columns = self.real.shape
        if rows < held:
            raise ValueError(
                f"a step of {rows} rows for a session of {held}: rows leave only by keep_rows"
            )
        cached = self.real.to(real.device)
        counts = self.counts.to(real.device)
        if rows > held:
            cached = torch.cat((cached, cached.new_zeros(rows - held, columns)))
            counts = torch.cat((counts, counts.new_zeros(rows - held)))
        positions = (counts[:, None] + real.cumsum(dim=1) - 1).clamp(min=0)
        mask = None
        if not (bool(real.all()) and bool(cached.all()) and (columns == 0 or tokens == 1)):
            causal = torch.ones(tokens, tokens, dtype=torch.bool, device=real.device).tril()
            # A padded query attends to itself at least: a row of nothing but -inf would
            # make NaN, and NaN times a zero weight is still NaN in the keys it leaves.
            own = (causal[None] & real[:, None, :]) | torch.eye(
                tokens, dtype=torch.bool, device=real.device
            )
            before = cached[:, None, :].expand(rows, tokens, columns)
            mask = torch.cat((before, own), dim=2)[:, None]
        self.real = torch.cat((cached, real), dim=1)
        self.counts = counts + real.sum(dim=1)
        self._layout = StepLayout(position, positions, mask)
        return self._layout

    def update(
        self, index: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's ``(rows, heads, seq, dim)`` keys and values; all of them so far.

        Rows that joined with this step get zeros in the earlier columns (masked out).
        """
        held = self.layers.get(index)
        if held is not None:
            old_keys, old_values = held
            missing = keys.shape[0] - old_keys.shape[0]
            if missing > 0:
                old_keys = torch.cat((old_keys, old_keys.new_zeros(missing, *old_keys.shape[1:])))
                old_values = torch.cat(
                    (old_values, old_values.new_zeros(missing, *old_values.shape[1:]))
                )
            keys = torch.cat((old_keys, keys), dim=-2)
            values = torch.cat((old_values, values), dim=-2)
        self.layers[index] = (keys, values)
        return keys, values

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order (rows of finished generations leave)."""
        index = torch.tensor(list(rows), dtype=torch.int64)
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.real.shape[0]):
            raise ValueError(
                f"rows {list(rows)} are not all among the session's {self.real.shape[0]}"
            )
        self.layers = {
            i: (k[index.to(k.device)], v[index.to(v.device)]) for i, (k, v) in self.layers.items()
        }
        self.real = self.real[index.to(self.real.device)]
        self.counts = self.counts[index.to(self.counts.device)]
        self._layout = None

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers.values()) + self.real.nbytes


def attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    mask: torch.Tensor | None,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """Scaled dot-product attention of ``(batch, heads, seq, dim)`` queries over
    ``(batch, kv_heads, keys, dim)`` keys and values; ``(batch, seq, heads * dim)``.

    Without a mask, causality is the kernel's flag (a single query attends to every key:
    a decode step). Key/value heads are shared by ``enable_gqa``, never copied per query
    head (``transformers`` repeats them when there is a mask; the result is the same, as
    the tests check bitwise).
    """
    out = F.scaled_dot_product_attention(
        query,
        keys,
        values,
        attn_mask=mask,
        scale=scale,
        is_causal=causal and mask is None and query.shape[2] > 1,
        enable_gqa=query.shape[1] != keys.shape[1],
    )
    batch, _, seq, _ = out.shape
    return out.transpose(1, 2).reshape(batch, seq, -1)


def embedding(rows: int, width: int) -> nn.Embedding:
    """An embedding table left uninitialised: its values come from the checkpoint.

    ``nn.Embedding``'s own initialisation (``normal_``) on the meta device loads torch's
    Python meta kernels, about 70 MiB of resident modules that a worker would keep.
    """
    return nn.Embedding(rows, width, _weight=torch.empty(rows, width))


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(batch, seq, heads * dim)`` → ``(batch, heads, seq, dim)``."""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


class Conv1D(nn.Module):
    """GPT-2's linear layer: the weight is stored ``(in, out)``, applied with ``addmm``."""

    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inputs, outputs))
        self.bias = nn.Parameter(torch.empty(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
    """Llama's norm: in float32, then scaled in the input's dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def _inverse_frequencies(head_dim: int, rope: Rope) -> torch.Tensor:
    # Always on the CPU: blocks are built under ``torch.device("meta")``, and these
    # are computed, not read from the checkpoint.
    steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv = 1.0 / (rope.theta ** (steps / head_dim))
    if rope.kind == "linear":
        inv = inv / rope.factor
    elif rope.kind == "llama3":
        low_wavelen = rope.original_max_positions / rope.low_freq_factor
        high_wavelen = rope.original_max_positions / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _LlamaAttention(nn.Module):
    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        width, kv_width = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        bias = arch.attention_bias
        self.q_proj = nn.Linear(arch.hidden_size, width, bias=bias)
        self.k_proj = nn.Linear(arch.hidden_size, kv_width, bias=bias)
        self.v_proj = nn.Linear(arch.hidden_size, kv_width, bias=bias)
        self.o_proj = nn.Linear(width, arch.hidden_size, bias=bias)


class _GatedMLP(nn.Module):
    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        bias = arch.mlp_bias
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=bias)
        self.act = activation(arch.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return out


class LlamaBlock(nn.Module):
    """A Llama decoder block: pre-RMSNorm, rotary grouped-query attention, gated MLP."""

    def __init__(self, arch: Architecture, index: int) -> None:
        super().__init__()
        self.index = index
        self.head_dim = arch.head_dim
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.self_attn = _LlamaAttention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.norm_eps)
        self.mlp = _GatedMLP(arch)
        self.register_buffer(
            "inv_freq", _inverse_frequencies(arch.head_dim, arch.rope), persistent=False
        )

    def _rotary(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``(1, 1, seq, head_dim)`` of the positions, in float32, then ``dtype``."""
        inv_freq = self.get_buffer("inv_freq")
        freqs = positions[..., None].float() * inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype).unsqueeze(1), angles.sin().to(dtype).unsqueeze(1)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: KVCache | None,
    ) -> torch.Tensor:
        residual = hidden
        x = self.input_layernorm(hidden)
        attn = self.self_attn
        q = _heads(attn.q_proj(x), self.head_dim)
        k = _heads(attn.k_proj(x), self.head_dim)
        v = _heads(attn.v_proj(x), self.head_dim)
        cos, sin = self._rotary(positions, x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.index, k, v)
        out = attention(q, k, v, mask=mask, scale=self.head_dim**-0.5, causal=True)
        hidden = residual + attn.o_proj(out)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))  # type: ignore[no-any-return]


class _GPT2Attention(nn.Module):
    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.c_attn = Conv1D(arch.hidden_size, 3 * arch.hidden_size)
        self.c_proj = Conv1D(arch.hidden_size, arch.hidden_size)


class _GPT2MLP(nn.Module):
    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.c_fc = Conv1D(arch.hidden_size, arch.intermediate_size)
        self.c_proj = Conv1D(arch.intermediate_size, arch.hidden_size)
        self.act = activation(arch.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.c_proj(self.act(self.c_fc(x)))
        return out


class GPT2Block(nn.Module):
    """A GPT-2 block: pre-LayerNorm multi-head attention and MLP."""

    def __init__(self, arch: Architecture, index: int) -> None:
        super().__init__()
        self.index = index
        self.head_dim = arch.head_dim
        self.hidden_size = arch.hidden_size
        self.scale = arch.head_dim**-0.5 if arch.scale_attn_weights else 1.0
        if arch.scale_attn_by_inverse_layer_idx:
            self.scale /= float(index + 1)
        self.ln_1 = nn.LayerNorm(arch.hidden_size, eps=arch.norm_eps)
        self.attn = _GPT2Attention(arch)
        self.ln_2 = nn.LayerNorm(arch.hidden_size, eps=arch.norm_eps)
        self.mlp = _GPT2MLP(arch)

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        positions: torch.Tensor,
        cache: KVCache | None,
    ) -> torch.Tensor:
        q, k, v = self.attn.c_attn(self.ln_1(hidden)).split(self.hidden_size, dim=2)
        q, k, v = (_heads(t, self.head_dim) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(self.index, k, v)
        out = attention(q, k, v, mask=mask, scale=self.scale, causal=True)
        hidden = self.attn.c_proj(out) + hidden
        return hidden + self.mlp(self.ln_2(hidden))  # type: ignore[no-any-return]


class BertEmbeddings(nn.Module):
    """BERT's embeddings: words + token type 0 + absolute positions, then LayerNorm."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.word_embeddings = embedding(arch.vocab_size, arch.hidden_size)
        self.position_embeddings = embedding(arch.max_positions, arch.hidden_size)
        self.token_type_embeddings = embedding(arch.type_vocab_size, arch.hidden_size)
        self.LayerNorm = nn.LayerNorm(arch.hidden_size, eps=arch.norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Every token is of type 0 (one segment), as when ``token_type_ids`` is not given.
        hidden = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]
        positions = torch.arange(ids.shape[1], device=ids.device)
        out: torch.Tensor = self.LayerNorm(hidden + self.position_embeddings(positions))
        return out


class _DenseNorm(nn.Module):
    """BERT's sublayer output: a projection, then LayerNorm of it plus the residual."""

    def __init__(self, arch: Architecture, inputs: int) -> None:
        super().__init__()
        self.dense = nn.Linear(inputs, arch.hidden_size)
        self.LayerNorm = nn.LayerNorm(arch.hidden_size, eps=arch.norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(self.dense(x) + residual)
        return out


class _Projections(nn.Module):
    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.query = nn.Linear(hidden, width)
        self.key = nn.Linear(hidden, width)
        self.value = nn.Linear(hidden, width)


class BertBlock(nn.Module):
    """A BERT encoder block: bidirectional attention and MLP, each followed by add & LayerNorm."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.head_dim = arch.head_dim
        width = arch.num_heads * arch.head_dim
        # Named as in the checkpoint: attention.self.query.weight, attention.output.dense.weight …
        self.attention = nn.ModuleDict(
            {"self": _Projections(arch.hidden_size, width), "output": _DenseNorm(arch, width)}
        )
        self.intermediate = nn.ModuleDict(
            {"dense": nn.Linear(arch.hidden_size, arch.intermediate_size)}
        )
        self.output = _DenseNorm(arch, arch.intermediate_size)
        self.act = activation(arch.activation)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        p = cast(_Projections, self.attention["self"])
        q, k, v = (_heads(f(hidden), self.head_dim) for f in (p.query, p.key, p.value))
        out = attention(q, k, v, mask=mask, scale=self.head_dim**-0.5, causal=False)
        hidden = self.attention["output"](out, hidden)
        return self.output(self.act(self.intermediate["dense"](hidden)), hidden)  # type: ignore[no-any-return]
