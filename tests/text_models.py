"""A tiny chat model: the seeded random Llama of ``hf_models`` with a real BPE tokenizer,
trained in the test (no hub), and a ChatML chat template, saved as ``save_pretrained`` does."""

from __future__ import annotations

import json
from pathlib import Path

from tests.hf_models import VOCAB, save

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, how are you today? i am fine, thank you!",
    "butterfly splits a model across several hosts and streams tokens back",
    "what is the capital of france? paris is the capital of france.",
]


def build_tokenizer(vocab_size: int = VOCAB) -> object:
    """A SentencePiece-style BPE (``▁`` marks word starts) over lowercase text, with
    ``<s>`` prepended to every encoding as Llama's tokenizer does."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL)
    tokenizer.train_from_iterator(CORPUS, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return tokenizer


def save_chat_llama(directory: Path, *, eos: list[int] | None = None) -> Path:
    """The model, ``tokenizer.json``, ``tokenizer_config.json`` with the chat template, and
    ``generation_config.json`` naming ``eos`` (default ``</s>`` and ``<|im_end|>``)."""
    save("llama", directory, max_position_embeddings=256)
    tokenizer = build_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))  # type: ignore[attr-defined]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "add_bos_token": True,
        "chat_template": CHATML,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    generation = {"bos_token_id": 1, "eos_token_id": eos if eos is not None else [2, 4]}
    (directory / "generation_config.json").write_text(json.dumps(generation))
    return directory
