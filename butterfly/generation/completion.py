"""A text generation's rows: prompts in, text pieces and finish reasons out, step by step.

The tokens come from :class:`~.service.GenerationService` like any generation's; this
module only turns each row's tokens into text (:class:`~butterfly.text.TextStream`) and
decides when a row is finished, as OpenAI's API reports it: ``"stop"`` at a stop token
(the model's EOS by default) or a stop string, ``"length"`` at ``max_new_tokens``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import attrs
import numpy as np

from ..errors import ApiError
from ..text import TextStream, Tokenizer

__all__ = ["Completion", "TextPiece", "split_stop"]

#: Prompt tokens that start a continuation's detokenizing window.
_CONTEXT = 4


@attrs.frozen
class TextPiece:
    """Text that row ``index`` added at a step, and why it ended if it did."""

    index: int
    text: str
    finish_reason: str | None = None


def split_stop(stop: object) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """``stop`` (a string, a token id, or a list of both) as stop strings and stop ids."""
    if stop is None:
        return (), ()
    items = [stop] if isinstance(stop, str | int) else stop
    if isinstance(items, bytes) or not isinstance(items, Sequence | set | frozenset):
        raise ApiError(f"stop must be a string, a token id or a list of them, got {stop!r}")
    strings = tuple(s for s in items if isinstance(s, str))
    if any(not s for s in strings):
        raise ApiError("a stop string must not be empty")
    ids = tuple(i for i in items if not isinstance(i, str))
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ApiError(f"stop token ids must be ints ≥ 0, got {i!r}")
    return strings, ids


@attrs.define
class Completion:
    """The rows of one text generation (several prompts, or one prompt ``n`` times)."""

    tokenizer: Tokenizer
    prompts: list[list[int]]
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    #: The answer continues the prompt's text (a completion, not a chat's answer): the
    #: first piece keeps the space between them.
    continuation: bool = True
    rows: list[TextStream] = attrs.field(init=False)
    #: Per row: why it ended (``None`` while it runs).
    finish_reasons: list[str | None] = attrs.field(init=False)
    #: Per row: tokens generated, its stop token included.
    generated: list[int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if not self.prompts or any(not p for p in self.prompts):
            raise ApiError("every prompt needs at least one token")
        for prompt in self.prompts:
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or t < 0]
            if bad:
                raise ApiError(f"prompt token ids must be ints ≥ 0, got {bad[0]!r}")
        self.rows = [
            TextStream(
                self.tokenizer, self.stop_strings, p[-_CONTEXT:] if self.continuation else ()
            )
            for p in self.prompts
        ]
        self.finish_reasons = [None] * len(self.prompts)
        self.generated = [0] * len(self.prompts)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(self.generated)

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.finish_reasons)

    def input_ids(self) -> np.ndarray:
        """The prompts as one ``(rows, longest)`` array, shorter rows padded with -1."""
        ids = np.full((len(self.prompts), max(map(len, self.prompts))), -1, dtype=np.int64)
        for row, prompt in enumerate(self.prompts):
            ids[row, : len(prompt)] = prompt
        return ids

    def step(self, tokens: np.ndarray) -> list[TextPiece]:
        """Each running row's next token; the text it adds (or its end)."""
        pieces = []
        for row, token in enumerate(tokens.tolist()):
            if self.finish_reasons[row] is not None:
                continue
            self.generated[row] += 1
            stream = self.rows[row]
            reason: str | None
            if token in self.stop_ids:
                text, reason = stream.flush(), "stop"
            else:
                text = stream.push(token)
                reason = "stop" if stream.finished else None
                if reason is None and self.generated[row] >= self.max_new_tokens:
                    text, reason = text + stream.flush(), "length"
            self.finish_reasons[row] = reason
            if text or reason:
                pieces.append(TextPiece(row, text, reason))
        return pieces

    async def run(
        self, steps: AsyncGenerator[np.ndarray, None]
    ) -> AsyncGenerator[list[TextPiece], None]:
        """Feed ``steps`` (a generation's tokens) through :meth:`step`; stops it as soon as
        every row is finished (a stop string ends a row before the model would)."""
        try:
            async for tokens in steps:
                pieces = self.step(tokens)
                if pieces:
                    yield pieces
                if self.done:
                    return
        finally:
            await steps.aclose()
