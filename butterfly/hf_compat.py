"""Hugging Face calling conventions: run ``transformers`` code on a cluster with one changed line.

    model = AutoModelForCausalLM.from_pretrained(path)                        # before
    model = AutoDistributedModelForCausalLM.from_pretrained(path, peers=[...])  # after
    out = model.generate(**tokenizer(texts, return_tensors="pt", padding=True), max_new_tokens=20)

(like Petals' class of the same name). ``generate`` takes ``transformers``' usual
arguments and answers as it does: the prompt as given followed by the new tokens, rows
that ended at an EOS token padded with ``pad_token_id``. Defaults come from the
directory's ``generation_config.json`` as ``transformers`` reads them. Calling the model
returns an object with ``.logits``. Arguments it does not implement (beam search,
``logits_processor``, …) raise ``ApiError`` naming them rather than being ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import torch

from ._facade import Butterfly, ConfigSource
from .errors import ApiError
from .model.eos import read_eos_token_ids

__all__ = ["AutoDistributedModelForCausalLM", "CausalLMOutput", "DistributedModelForCausalLM"]

#: What ``generate`` understands; the rest of transformers' arguments are refused.
_ACCEPTED = {
    "max_new_tokens",
    "max_length",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "seed",
    "num_beams",
    "use_cache",
    "return_dict_in_generate",
}


@attrs.frozen
class CausalLMOutput:
    logits: torch.Tensor


class DistributedModelForCausalLM:
    """A decoder served by a cluster, called like a ``transformers`` causal LM."""

    def __init__(self, client: Butterfly, defaults: dict[str, Any]) -> None:
        self.client = client
        self.defaults = defaults

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any
    ) -> CausalLMOutput:
        return CausalLMOutput(self.client.infer(input_ids, attention_mask=attention_mask))

    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if input_ids is None:
            raise ApiError("generate needs input_ids (what a tokenizer returns)")
        unknown = sorted(set(kwargs) - _ACCEPTED - {"generation_config"})
        if unknown:
            raise ApiError(
                f"generate() does not implement {', '.join(unknown)}; it takes "
                f"{', '.join(sorted(_ACCEPTED))}"
            )
        settings = {
            **self.defaults,
            **_from_generation_config(kwargs.pop("generation_config", None)),
            **kwargs,
        }
        if settings.get("num_beams", 1) != 1:
            raise ApiError(f"num_beams={settings['num_beams']}: beam search is not implemented")
        if settings.get("return_dict_in_generate"):
            raise ApiError("return_dict_in_generate is not implemented: generate returns ids")
        seq = input_ids.shape[-1]
        new = settings.get("max_new_tokens")
        if new is None:
            new = settings.get("max_length", 20) - seq
            if new < 1:
                raise ApiError(
                    f"max_length={settings.get('max_length', 20)} leaves no room after a prompt of {seq} tokens"
                )
        eos = _ids(settings.get("eos_token_id"))
        do_sample = bool(settings.get("do_sample", False))
        out = self.client.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new,
            do_sample=do_sample,
            temperature=settings.get("temperature", 1.0) if do_sample else 1.0,
            top_k=(settings.get("top_k", 50) or 0) if do_sample else 0,
            top_p=settings.get("top_p", 1.0) if do_sample else 1.0,
            seed=settings.get("seed"),
            stop=eos,
        )
        assert isinstance(out, torch.Tensor)
        pad = settings.get("pad_token_id")
        if pad is None:
            pad = eos[0] if eos else 0
        # transformers pads a row after its EOS token; Butterfly's rows repeat it.
        generated = out[:, seq:]
        if eos:
            ended = torch.isin(generated, torch.tensor(eos, device=generated.device))
            after = (ended.long().cumsum(dim=1) - ended.long()) > 0
            generated = generated.masked_fill(after, pad)
        return torch.cat([out[:, :seq], generated], dim=1)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AutoDistributedModelForCausalLM:
    """``from_pretrained(path, peers=[...])``: connect to the workers that serve ``path``."""

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        peers: Iterable[str] | str,
        config: ConfigSource = None,
        secret: str | bytes | None = None,
        **unsupported: Any,
    ) -> DistributedModelForCausalLM:
        """``pretrained_model_name_or_path`` is the model's local directory (its
        ``generation_config.json`` gives ``generate``'s defaults; its tokenizer enables text
        on ``.client``); ``peers`` are the workers serving it."""
        if unsupported:
            raise ApiError(
                f"from_pretrained() does not take {', '.join(sorted(unsupported))}: the workers "
                "hold the weights (their --dtype and --device set what transformers' "
                "torch_dtype and device_map would)"
            )
        directory = Path(pretrained_model_name_or_path).expanduser()
        if not directory.is_dir():
            raise ApiError(
                f"{str(directory)!r} is not a directory: give the model's local directory "
                "(the hub is not reached)"
            )
        tokenizer = directory if (directory / "tokenizer.json").is_file() else None
        client = Butterfly.connect(peers, config=config, secret=secret, tokenizer=tokenizer)
        return DistributedModelForCausalLM(client, _defaults(directory))


def _defaults(directory: Path) -> dict[str, Any]:
    defaults: dict[str, Any] = {"eos_token_id": list(read_eos_token_ids(directory))}
    try:
        raw = json.loads((directory / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return defaults
    for key in (
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "max_length",
        "max_new_tokens",
        "pad_token_id",
    ):
        if raw.get(key) is not None:
            defaults[key] = raw[key]
    return defaults


def _from_generation_config(config: object) -> dict[str, Any]:
    """A ``transformers.GenerationConfig``'s settings that differ from ``None``."""
    if config is None:
        return {}
    return {k: getattr(config, k) for k in _ACCEPTED if getattr(config, k, None) is not None}


def _ids(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    return [int(v) for v in value]  # type: ignore[attr-defined]
