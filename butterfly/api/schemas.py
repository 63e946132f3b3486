"""Request bodies of the gateway as msgspec Structs: decoding is validation (a wrong type
names the field: ``Expected `int`, got `str` - at `$.max_tokens```), and the OpenAPI
document's schemas are generated from the same classes.

Unknown fields are ignored, as OpenAI's API does: its clients send fields (``user``,
``logit_bias``, …) that a server may not implement.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "EncodedTensor",
    "GenerationRequest",
    "InferenceRequest",
    "StreamOptions",
]

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
Count = Annotated[int, msgspec.Meta(ge=1, le=128)]
Tokens = Annotated[int, msgspec.Meta(ge=1)]
Stop = str | list[str] | None
#: Text, texts, token ids, or lists of token ids (msgspec allows one array type in a union:
#: which of these a list is, the gateway checks).
Prompt = str | list[str | int | list[int]]


class EncodedTensor(msgspec.Struct):
    """A tensor as bytes: ``data_b64`` is the C-order, little-endian data in base64."""

    dtype: str
    shape: list[Annotated[int, msgspec.Meta(ge=0)]]
    data_b64: str


class InferenceRequest(msgspec.Struct):
    """``POST /v1/inference``: one input through the model's stages."""

    #: Nested lists (the model's input dtype) or an encoded tensor; batch first.
    input: list[Any] | EncodedTensor
    priority: int = 0
    #: Answer with the output (true) or at once with the task's id (false).
    wait: bool = False
    timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class GenerationRequest(msgspec.Struct, kw_only=True):
    """The settings completions and chat share (how the next token is chosen, how the
    answer comes)."""

    model: str
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    #: Not OpenAI's, as vLLM and llama.cpp's server offer it (0: all tokens).
    top_k: Annotated[int, msgspec.Meta(ge=0)] = 0
    n: Count = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Annotated[int, msgspec.Meta(ge=0)] | None = None


class CompletionRequest(GenerationRequest, kw_only=True):
    """``POST /v1/completions`` (OpenAI's legacy text completion)."""

    #: Text, texts, token ids, or lists of token ids.
    prompt: Prompt
    max_tokens: Tokens | None = 16
    echo: bool = False


class ChatMessage(msgspec.Struct):
    role: str
    #: Text, or OpenAI's content parts (only ``{"type": "text", "text": ...}`` parts).
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(GenerationRequest, kw_only=True):
    """``POST /v1/chat/completions``: the model's chat template makes the prompt."""

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    #: Default: as many as the model's context leaves.
    max_tokens: Tokens | None = None
    #: OpenAI's newer name for ``max_tokens``.
    max_completion_tokens: Tokens | None = None


class EmbeddingRequest(msgspec.Struct):
    """``POST /v1/embeddings``, for encoder models."""

    model: str
    input: Prompt
    encoding_format: Literal["float", "base64"] = "float"
