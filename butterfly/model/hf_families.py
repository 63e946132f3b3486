"""Where each Butterfly layer of a Hugging Face model finds its tensors in a checkpoint.

A family (``config.json``'s ``model_type``) lists its layers, each with the checkpoint
prefix of its submodules (``{"block": "transformer.h.3"}``), the prefix of the base model's
keys in its task models' checkpoints (``bert.``, ``model.``), and which LM head is tied to
the token embeddings.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from torch import nn

from .architecture import Architecture
from .blocks import BertBlock, GPT2Block, LlamaBlock, RMSNorm
from .hf_layers import (
    DecoderBlock,
    EncoderBlock,
    EncoderEmbedding,
    HFLayer,
    LanguageModelHead,
    MeanPooling,
    TokenEmbedding,
)

__all__ = ["FAMILIES", "Family", "LayerPlan"]


@attrs.frozen
class LayerPlan:
    """One layer on the meta device, and where its submodules' tensors are in the checkpoint.

    ``sources`` maps a submodule name of ``layer`` to its prefix in the checkpoint:
    ``{"block": "transformer.h.3"}`` makes ``block.ln_1.weight`` the checkpoint's
    ``transformer.h.3.ln_1.weight``.
    """

    layer: HFLayer
    sources: dict[str, str]

    def model_keys(self) -> dict[str, str]:
        """Layer state-dict name → model state-dict name, for every tensor the layer stores."""
        keys = {}
        for name in self.layer.state_dict(keep_vars=True):
            head, _, rest = name.partition(".")
            keys[name] = f"{self.sources[head]}.{rest}"
        return keys


@attrs.frozen
class Family:
    #: Prefix of the base model's keys in checkpoints of its task models (``bert.``, ``model.``).
    base_prefix: str
    layers: Callable[[Architecture], list[LayerPlan]]
    #: The LM head's key, and the embedding it is read from when the weights are tied.
    tied_head: tuple[str, str] | None = None
    encoder: bool = False


def _gpt2_layers(arch: Architecture) -> list[LayerPlan]:
    return [
        LayerPlan(
            TokenEmbedding(arch, learned_positions=True),
            {"tokens": "transformer.wte", "positions": "transformer.wpe"},
        ),
        *(
            LayerPlan(DecoderBlock(GPT2Block(arch, i), arch), {"block": f"transformer.h.{i}"})
            for i in range(arch.num_layers)
        ),
        LayerPlan(
            LanguageModelHead(nn.LayerNorm(arch.hidden_size, eps=arch.norm_eps), arch),
            {"norm": "transformer.ln_f", "head": "lm_head"},
        ),
    ]


def _llama_layers(arch: Architecture) -> list[LayerPlan]:
    return [
        LayerPlan(TokenEmbedding(arch, learned_positions=False), {"tokens": "model.embed_tokens"}),
        *(
            LayerPlan(DecoderBlock(LlamaBlock(arch, i), arch), {"block": f"model.layers.{i}"})
            for i in range(arch.num_layers)
        ),
        LayerPlan(
            LanguageModelHead(RMSNorm(arch.hidden_size, arch.norm_eps), arch),
            {"norm": "model.norm", "head": "lm_head"},
        ),
    ]


def _bert_layers(arch: Architecture) -> list[LayerPlan]:
    return [
        LayerPlan(EncoderEmbedding(arch), {"embeddings": "embeddings"}),
        *(
            LayerPlan(EncoderBlock(BertBlock(arch), arch), {"block": f"encoder.layer.{i}"})
            for i in range(arch.num_layers)
        ),
        LayerPlan(MeanPooling(arch.hidden_size), {}),
    ]


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        "transformer", _gpt2_layers, tied_head=("lm_head.weight", "transformer.wte.weight")
    ),
    "llama": Family(
        "model", _llama_layers, tied_head=("lm_head.weight", "model.embed_tokens.weight")
    ),
    "bert": Family("bert", _bert_layers, encoder=True),
}
