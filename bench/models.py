"""Models the benchmarks share: Llama-shaped, random weights, saved like ``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch


def save_model(
    directory: Path,
    hidden: int,
    layers: int,
    vocab: int,
    *,
    heads: int | None = None,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A Llama-shaped model with random weights, saved with ``save_pretrained``; heads of 64
    and a quarter as many key/value heads unless given."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=heads or hidden // 64,
        num_key_value_heads=kv_heads or max(1, hidden // 256),
        vocab_size=vocab,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.to(dtype).save_pretrained(directory, safe_serialization=True)
    return directory
