"""A ``tokenizers`` tokenizer built from a GGUF file's ``tokenizer.ggml.*`` metadata.

GGUF files carry their tokenizer: the vocabulary (``tokens``, ``token_type``), the BPE
``merges``, the pre-tokenizer's name (``pre``), the special tokens' ids and the chat
template. Two models are rebuilt:

- ``gpt2``: byte-level BPE with merges, split first by the regular expressions llama.cpp
  uses for the file's ``pre`` (``llama-vocab.cpp``); an unknown ``pre`` is refused, since
  a wrong split silently changes the tokens.
- ``llama``: SentencePiece BPE with scores and byte fallback (Llama 2, Mistral, TinyLlama):
  its merges are ranked by the score of the token they make, which is the order
  SentencePiece merges in.

Control and user-defined tokens become special added tokens, matched whole in the text
and dropped by ``decode(skip_special_tokens=True)``.
"""

from __future__ import annotations

from typing import Any

from ..errors import ModelError
from .gguf_file import GGUFFile

__all__ = ["GGUF_PRE_TOKENIZERS", "build_gguf_tokenizer"]

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
#: ``tokenizer.ggml.pre`` → (split each digit first, the split expression).
GGUF_PRE_TOKENIZERS: dict[str, tuple[bool, str]] = {
    "default": (False, _GPT2_SPLIT),
    "gpt2": (False, _GPT2_SPLIT),
    "gpt-2": (False, _GPT2_SPLIT),
    "smollm": (True, _GPT2_SPLIT),
    "starcoder": (True, _GPT2_SPLIT),
    "refact": (True, _GPT2_SPLIT),
    "llama-bpe": (False, _LLAMA3_SPLIT),
    "llama3": (False, _LLAMA3_SPLIT),
    "qwen2": (False, _QWEN2_SPLIT),
}
#: ``tokenizer.ggml.token_type`` values (llama.cpp's ``llama_token_type``).
_CONTROL, _USER_DEFINED = 3, 4


def build_gguf_tokenizer(file: GGUFFile) -> tuple[Any, dict[str, str]]:
    """The file's tokenizer, and its special tokens by role (``bos_token``, ``eos_token``, …)."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

    where = f"GGUF file {str(file.path)!r}"
    kind = file.value("tokenizer.ggml.model", None)
    if kind is None:
        raise ModelError(f"{where} has no tokenizer (no tokenizer.ggml.model); pass token ids")
    tokens: list[str] = list(file.value("tokenizer.ggml.tokens"))
    types: list[int] = list(file.value("tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {token: i for i, token in enumerate(tokens)}
    if kind == "gpt2":
        pre = file.value("tokenizer.ggml.pre", "default")
        if pre not in GGUF_PRE_TOKENIZERS:
            raise ModelError(
                f"{where}: tokenizer.ggml.pre is {pre!r}; supported: "
                f"{', '.join(sorted(GGUF_PRE_TOKENIZERS))}"
            )
        merges = [tuple(m.split(" ", 1)) for m in file.value("tokenizer.ggml.merges")]
        tokenizer = tokenizers.Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
        digits, split = GGUF_PRE_TOKENIZERS[pre]
        steps: list[Any] = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
        steps += [
            pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
        tokenizer.decoder = decoders.ByteLevel()
    elif kind == "llama":
        scores: list[float] = list(file.value("tokenizer.ggml.scores"))
        unk = file.value("tokenizer.ggml.unknown_token_id", 0)
        model = models.BPE(
            vocab,
            _merges_by_score(tokens, scores, vocab),
            unk_token=tokens[unk],
            fuse_unk=True,
            byte_fallback=True,
        )
        tokenizer = tokenizers.Tokenizer(model)
        steps_n: list[Any] = [normalizers.Replace(" ", "▁")]
        if file.value("tokenizer.ggml.add_space_prefix", True):
            steps_n.insert(0, normalizers.Prepend("▁"))
        tokenizer.normalizer = normalizers.Sequence(steps_n)
        tokenizer.decoder = decoders.Sequence(
            [
                decoders.Replace("▁", " "),
                decoders.ByteFallback(),
                decoders.Fuse(),
                *(
                    [decoders.Strip(" ", 1, 0)]
                    if file.value("tokenizer.ggml.add_space_prefix", True)
                    else []
                ),
            ]
        )
    else:
        raise ModelError(f"{where}: tokenizer.ggml.model is {kind!r}; supported: gpt2, llama")
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind_ in zip(tokens, types, strict=False)
            if kind_ in (_CONTROL, _USER_DEFINED)
        ]
    )
    special = {}
    for role in ("bos", "eos", "unknown", "padding", "seperator"):
        index = file.value(f"tokenizer.ggml.{role}_token_id", None)
        if isinstance(index, int) and 0 <= index < len(tokens):
            name = {"unknown": "unk", "padding": "pad", "seperator": "sep"}.get(role, role)
            special[f"{name}_token"] = tokens[index]
    # What llama.cpp adds around a prompt: BOS unless add_bos_token is false, EOS if asked.
    bos = (
        special.get("bos_token")
        if file.value("tokenizer.ggml.add_bos_token", kind == "llama")
        else None
    )
    eos = special.get("eos_token") if file.value("tokenizer.ggml.add_eos_token", False) else None
    if bos or eos:
        single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
        pair = " ".join(
            [single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])]
        )
        tokenizer.post_processor = processors.TemplateProcessing(
            single=single,
            pair=pair,
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(x for x in (bos, eos) if x)],
        )
    return tokenizer, special


def _merges_by_score(
    tokens: list[str], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """SentencePiece's BPE order as merges: every split of a token into two tokens of the
    vocabulary, the highest-scoring results first (ties: the lower id first)."""
    ranked = []
    for token, score in zip(tokens, scores, strict=False):
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[token], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]
