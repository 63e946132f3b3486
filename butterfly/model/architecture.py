"""What a Hugging Face ``config.json`` says a model computes, read without ``transformers``.

Workers build GPT-2, Llama and BERT blocks themselves (:mod:`butterfly.model.blocks`), so a
worker process never imports ``transformers``: its modeling code alone costs a process about
150 MiB, which a worker holding a few hundred MiB of weights cannot spare. The defaults
below are those of ``transformers``' own ``GPT2Config``, ``LlamaConfig`` and ``BertConfig``
for keys a ``config.json`` leaves out; a key whose value changes the arithmetic in a way the
blocks do not implement is refused by name rather than ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from ..errors import ModelError
from .activations import ACTIVATIONS

__all__ = ["Architecture", "Rope", "parse_architecture"]

_ROPE_TYPES = ("default", "linear", "llama3")


@attrs.frozen
class Rope:
    """Rotary position embedding parameters (Llama)."""

    theta: float = 10000.0
    kind: str = "default"
    #: ``linear`` and ``llama3``: how much the context was stretched.
    factor: float = 1.0
    #: ``llama3`` only.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@attrs.frozen
class Architecture:
    """The shape and arithmetic of one supported model, from its ``config.json``."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    norm_eps: float
    activation: str
    tie_word_embeddings: bool
    #: The id padded positions are looked up as (the model's ``pad_token_id``, else 0).
    pad_id: int = 0
    attention_bias: bool = False
    mlp_bias: bool = False
    #: GPT-2: divide scores by sqrt(head_dim) (``scale_attn_weights``), and by layer + 1.
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    type_vocab_size: int = 2
    rope: Rope = attrs.field(factory=Rope)


class _Reader:
    """Typed access to one ``config.json``; errors name the key, its value and what was expected."""

    def __init__(self, raw: Mapping[str, Any], where: str) -> None:
        self.raw = raw
        self.where = where

    def _fail(self, key: str, value: Any, expected: str) -> ModelError:
        return ModelError(f"{self.where}: {key} is {value!r}; expected {expected}")

    def integer(self, key: str, default: int | None, *, minimum: int = 1) -> int:
        value = self.raw.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._fail(key, value, f"an integer >= {minimum}")
        return value

    def number(self, key: str, default: float) -> float:
        value = self.raw.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise self._fail(key, value, "a positive number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if value is None:
            value = default
        if not isinstance(value, bool):
            raise self._fail(key, value, "true or false")
        return value

    def activation(self, key: str, default: str) -> str:
        value = self.raw.get(key, default)
        if value not in ACTIVATIONS:
            raise self._fail(key, value, f"one of {', '.join(ACTIVATIONS)}")
        return str(value)

    def require(self, key: str, value: Any, allowed: Any, expected: str) -> None:
        """Refuse a setting the blocks do not implement."""
        if self.raw.get(key, value) not in allowed:
            raise self._fail(key, self.raw.get(key), expected)

    def pad_id(self, vocab_size: int) -> int:
        pad = self.raw.get("pad_token_id")
        return pad if isinstance(pad, int) and 0 <= pad < vocab_size else 0

    def heads(self, hidden: int, heads: int, head_dim_key: str | None = None) -> tuple[int, int]:
        """``(head_dim, heads)``; the head dimension is ``hidden // heads`` unless given."""
        explicit = self.raw.get(head_dim_key) if head_dim_key else None
        if explicit is not None:
            return self.integer(head_dim_key or "", None), heads
        if hidden % heads:
            raise self._fail("num_attention_heads", heads, f"a divisor of the hidden size {hidden}")
        return hidden // heads, heads


def _gpt2(c: _Reader) -> Architecture:
    hidden = c.integer("n_embd", 768)
    head_dim, heads = c.heads(hidden, c.integer("n_head", 12))
    c.require("add_cross_attention", False, (False,), "false (no cross-attention blocks)")
    inner = c.raw.get("n_inner")
    vocab = c.integer("vocab_size", 50257)
    return Architecture(
        model_type="gpt2",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=c.integer("n_layer", 12),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=4 * hidden if inner is None else c.integer("n_inner", None),
        max_positions=c.integer("n_positions", 1024),
        norm_eps=c.number("layer_norm_epsilon", 1e-5),
        activation=c.activation("activation_function", "gelu_new"),
        tie_word_embeddings=c.flag("tie_word_embeddings", True),
        pad_id=c.pad_id(vocab),
        attention_bias=True,
        mlp_bias=True,
        scale_attn_weights=c.flag("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=c.flag("scale_attn_by_inverse_layer_idx", False),
    )


def _rope(c: _Reader) -> Rope:
    """``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (older files)."""
    params = c.raw.get("rope_parameters")
    if params is None:
        params = dict(c.raw.get("rope_scaling") or {})
        params.setdefault("rope_theta", c.raw.get("rope_theta", 10000.0))
    if not isinstance(params, Mapping):
        raise ModelError(f"{c.where}: rope_parameters is {params!r}; expected an object")
    r = _Reader(params, f"{c.where}: rope_parameters")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise r._fail("rope_type", kind, f"one of {', '.join(_ROPE_TYPES)}")
    r.require("partial_rotary_factor", 1.0, (1, 1.0), "1.0 (rotation of whole heads)")
    if kind == "default":
        return Rope(theta=r.number("rope_theta", 10000.0))
    if kind == "linear":
        return Rope(
            theta=r.number("rope_theta", 10000.0), kind=kind, factor=r.number("factor", 1.0)
        )
    return Rope(
        theta=r.number("rope_theta", 10000.0),
        kind=kind,
        factor=r.number("factor", 8.0),
        low_freq_factor=r.number("low_freq_factor", 1.0),
        high_freq_factor=r.number("high_freq_factor", 4.0),
        original_max_positions=r.integer("original_max_position_embeddings", 8192),
    )


def _llama(c: _Reader) -> Architecture:
    hidden = c.integer("hidden_size", 4096)
    head_dim, heads = c.heads(hidden, c.integer("num_attention_heads", 32), "head_dim")
    kv_heads = c.integer("num_key_value_heads", heads)
    if heads % kv_heads:
        raise c._fail("num_key_value_heads", kv_heads, f"a divisor of num_attention_heads {heads}")
    vocab = c.integer("vocab_size", 32000)
    return Architecture(
        model_type="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=c.integer("num_hidden_layers", 32),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=c.integer("intermediate_size", 11008),
        max_positions=c.integer("max_position_embeddings", 2048),
        norm_eps=c.number("rms_norm_eps", 1e-6),
        activation=c.activation("hidden_act", "silu"),
        tie_word_embeddings=c.flag("tie_word_embeddings", False),
        pad_id=c.pad_id(vocab),
        attention_bias=c.flag("attention_bias", False),
        mlp_bias=c.flag("mlp_bias", False),
        rope=_rope(c),
    )


def _bert(c: _Reader) -> Architecture:
    hidden = c.integer("hidden_size", 768)
    head_dim, heads = c.heads(hidden, c.integer("num_attention_heads", 12))
    c.require("position_embedding_type", "absolute", ("absolute",), "'absolute'")
    c.require("is_decoder", False, (False,), "false (an encoder)")
    vocab = c.integer("vocab_size", 30522)
    return Architecture(
        model_type="bert",
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=c.integer("num_hidden_layers", 12),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        intermediate_size=c.integer("intermediate_size", 3072),
        max_positions=c.integer("max_position_embeddings", 512),
        norm_eps=c.number("layer_norm_eps", 1e-12),
        activation=c.activation("hidden_act", "gelu"),
        tie_word_embeddings=False,
        pad_id=c.pad_id(vocab),
        attention_bias=True,
        mlp_bias=True,
        type_vocab_size=c.integer("type_vocab_size", 2),
    )


_PARSERS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert}


def parse_architecture(raw: Mapping[str, Any], where: str) -> Architecture:
    """The :class:`Architecture` of a parsed ``config.json``; ``where`` names it in errors."""
    model_type = raw.get("model_type")
    parse = _PARSERS.get(model_type) if isinstance(model_type, str) else None
    if parse is None:
        raise ModelError(
            f"{where}: model_type is {model_type!r}; supported: {', '.join(sorted(_PARSERS))}"
        )
    return parse(_Reader(raw, where))
