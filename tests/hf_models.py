"""Tiny Hugging Face models with seeded random weights, saved like ``save_pretrained`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

VOCAB = 96
FAMILIES = ("gpt2", "llama", "bert")
#: The transformers class each test model is saved from.
MODEL_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertModel"}


def config(family: str) -> Any:
    transformers = pytest.importorskip("transformers")
    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=32, **common)
    if family == "llama":
        return transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention
            max_position_embeddings=32,
            **common,
        )
    return transformers.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=32,
        pad_token_id=0,
        vocab_size=VOCAB,
    )


def save(family: str, directory: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = getattr(transformers, MODEL_CLASSES[family])(config(family))
    # Initialised weights are tiny (std 0.02) and biases zero; wider ones exercise more.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
