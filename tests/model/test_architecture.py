"""``config.json`` → :class:`Architecture`: defaults, old rope keys, and settings refused by name."""

from __future__ import annotations

from typing import Any

import pytest

from butterfly.errors import ModelError
from butterfly.model.architecture import Rope, parse_architecture

WHERE = "model 'hf:m': config.json"


def _llama(**settings: Any) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, **settings}


def test_missing_keys_take_the_transformers_defaults() -> None:
    arch = parse_architecture({"model_type": "gpt2"}, WHERE)
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.head_dim) == (768, 12, 12, 64)
    assert (arch.vocab_size, arch.max_positions, arch.intermediate_size) == (50257, 1024, 3072)
    assert (arch.activation, arch.norm_eps, arch.tie_word_embeddings) == ("gelu_new", 1e-5, True)


def test_llama_key_value_heads_default_to_the_attention_heads() -> None:
    arch = parse_architecture(_llama(), WHERE)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (4, 4, 16)
    assert arch.rope == Rope(theta=10000.0, kind="default")


def test_old_style_rope_theta_and_scaling_are_read() -> None:
    arch = parse_architecture(
        _llama(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0}), WHERE
    )
    assert arch.rope == Rope(theta=500000.0, kind="linear", factor=2.0)


def test_a_pad_token_outside_the_vocabulary_pads_with_zero() -> None:
    assert parse_architecture(_llama(vocab_size=10, pad_token_id=12), WHERE).pad_id == 0
    assert parse_architecture(_llama(vocab_size=10, pad_token_id=3), WHERE).pad_id == 3


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            _llama(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}),
            r"rope_type is 'yarn'; expected one of default, linear, llama3",
        ),
        (
            _llama(num_key_value_heads=3),
            r"num_key_value_heads is 3; expected a divisor of num_attention_heads 4",
        ),
        (
            {"model_type": "gpt2", "n_embd": 30, "n_head": 4},
            r"num_attention_heads is 4; expected a divisor of the hidden size 30",
        ),
        (
            {"model_type": "gpt2", "add_cross_attention": True},
            r"add_cross_attention is True; expected false",
        ),
        (
            {"model_type": "bert", "position_embedding_type": "relative_key"},
            r"position_embedding_type is 'relative_key'; expected 'absolute'",
        ),
        (
            {"model_type": "bert", "hidden_act": "quick_gelu"},
            r"hidden_act is 'quick_gelu'; expected one of gelu, gelu_new",
        ),
        (_llama(hidden_size="64"), r"hidden_size is '64'; expected an integer >= 1"),
        (_llama(rms_norm_eps=-1), r"rms_norm_eps is -1; expected a positive number"),
        ({"model_type": "t5"}, r"model_type is 't5'; supported: bert, gpt2, llama"),
    ],
)
def test_settings_the_blocks_do_not_implement_are_refused_by_name(
    raw: dict[str, Any], message: str
) -> None:
    with pytest.raises(ModelError, match=rf"^model 'hf:m': config.json.*{message}"):
        parse_architecture(raw, WHERE)
