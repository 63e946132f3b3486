"""Tiny Hugging Face models with seeded random weights, saved like ``save_pretrained`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 96
FAMILIES = ("gpt2", "llama", "bert")
#: The transformers class each test model is saved from.
MODEL_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertModel"}


#: Settings other than the defaults that change the arithmetic, one variant per family.
VARIANTS: dict[str, dict[str, Any]] = {
    "gpt2": {"activation_function": "gelu", "scale_attn_by_inverse_layer_idx": True},
    "llama": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
        "tie_word_embeddings": True,
        "attention_bias": True,
        "mlp_bias": True,
        "head_dim": 16,  # wider than hidden / heads
    },
    "bert": {"hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "num_attention_heads": 2},
}


def config(family: str, **overrides: Any) -> Any:
    import transformers

    common = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2}
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=32, n_layer=3, n_head=4, n_positions=32, **common, **overrides
        )
    if family == "llama":
        return transformers.LlamaConfig(
            **{
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,  # grouped-query attention
                "max_position_embeddings": 32,
                **common,
                **overrides,
            }
        )
    return transformers.BertConfig(
        **{
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "max_position_embeddings": 32,
            "pad_token_id": 0,
            "vocab_size": VOCAB,
            **overrides,
        }
    )


def save(family: str, directory: Path, **overrides: Any) -> Path:
    import transformers

    torch.manual_seed(0)
    model = getattr(transformers, MODEL_CLASSES[family])(config(family, **overrides))
    # Initialised weights are tiny (std 0.02) and biases zero; wider ones exercise more.
    # GPT-2 with every tensor at 0.3 predicts one token whatever the input (its norm
    # biases dominate the tied head), which would hide a wrong position or mask from the
    # generation tests: its norms and biases stay near their usual values instead.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if family != "gpt2":
                p.normal_(0.0, 0.3)
            elif name.endswith("wte.weight"):
                p.normal_(0.0, 1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 0.5)
            else:
                p.normal_(1.0 if ".ln_" in name and name.endswith("weight") else 0.0, 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
