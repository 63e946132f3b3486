"""How a generation's next token is chosen, and the checks of a caller's prompt and settings.

The coordinator's half of sampling: :func:`next_tokens` turns a step's logits into each
row's next token, greedily or by seeded sampling with temperature, top-k and top-p.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs
import numpy as np
import torch

from ..errors import ApiError

__all__ = ["SamplingParams", "check_token_ids", "next_tokens"]


@attrs.frozen
class SamplingParams:
    """How the next token is chosen; validated by :meth:`check`."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    #: Keep only the ``top_k`` most likely tokens (0: all).
    top_k: int = 0
    #: Keep the smallest set of most likely tokens whose probability reaches ``top_p``.
    top_p: float = 1.0
    seed: int | None = None
    #: Token ids that end a row; generation ends when every row has produced one.
    stop: frozenset[int] = frozenset()

    @classmethod
    def check_names(cls, sampling: dict[str, object]) -> None:
        """``ApiError`` naming any key of ``sampling`` that is not a setting."""
        names = {f.name for f in attrs.fields(cls)}
        unknown = sorted(set(sampling) - names)
        if unknown:
            raise ApiError(
                f"unknown generation setting(s) {', '.join(map(repr, unknown))}; expected "
                f"some of {', '.join(sorted(names))}"
            )
        if "max_new_tokens" not in sampling:
            raise ApiError("max_new_tokens is required: how many tokens to generate at most")

    @classmethod
    def check(
        cls,
        *,
        max_new_tokens: object,
        do_sample: object = False,
        temperature: object = 1.0,
        top_k: object = 0,
        top_p: object = 1.0,
        seed: object = None,
        stop: Iterable[object] = (),
    ) -> SamplingParams:
        def integer(name: str, value: object, least: int) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ApiError(f"{name} must be an int ≥ {least}, got {value!r}")
            return value

        def real(name: str, value: object) -> float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ApiError(f"{name} must be a number, got {value!r}")
            return float(value)

        if not isinstance(do_sample, bool):
            raise ApiError(f"do_sample must be True or False, got {do_sample!r}")
        temp = real("temperature", temperature)
        if not temp > 0:
            raise ApiError(f"temperature must be > 0, got {temperature!r}")
        p = real("top_p", top_p)
        if not 0 < p <= 1:
            raise ApiError(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is not None:
            integer("seed", seed, 0)
        if isinstance(stop, str | bytes) or not isinstance(stop, Iterable):
            raise ApiError(f"stop must be a collection of token ids, got {stop!r}")
        return cls(
            max_new_tokens=integer("max_new_tokens", max_new_tokens, 1),
            do_sample=do_sample,
            temperature=temp,
            top_k=integer("top_k", top_k, 0),
            top_p=p,
            seed=seed,  # type: ignore[arg-type]
            stop=frozenset(integer("stop token", t, 0) for t in stop),
        )


def check_token_ids(ids: object) -> np.ndarray:
    """A caller's prompt as a ``(batch, seq)`` int64 array; ``ApiError`` otherwise."""
    if isinstance(ids, torch.Tensor):
        array = ids.detach().to("cpu").numpy()
    elif isinstance(ids, np.ndarray):
        array = ids
    else:
        raise ApiError(
            f"input_ids must be a numpy array or torch tensor of token ids, got {type(ids).__name__}"
        )
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ApiError(f"input_ids must have shape (batch, seq) with both ≥ 1, got {array.shape}")
    if array.dtype.kind not in "iu":
        raise ApiError(f"input_ids must hold integers, got dtype {array.dtype}")
    empty = np.flatnonzero((array < 0).all(axis=1))
    if empty.size:
        raise ApiError(
            f"row {int(empty[0])} of input_ids is all padding (negative ids); every row "
            "needs at least one token"
        )
    return np.ascontiguousarray(array, dtype=np.int64)


def next_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> torch.Tensor:
    """The next token of every row from its ``(batch, vocab)`` logits."""
    logits = logits.float()
    if not params.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probabilities = ordered.softmax(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the first always stays).
        drop = probabilities.cumsum(dim=-1) - probabilities >= params.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
