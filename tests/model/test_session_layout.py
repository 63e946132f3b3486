"""Rows of different lengths in one session compute what they compute alone, at the logits.

Greedy tokens of tiny random models are too coarse to show a wrong position (GPT-2's
repeat one token; Llama's rotary embedding only sees relative positions), so these
tests compare each row's logits, step by step, with the row run as a session of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from butterfly.model import ModelSource
from butterfly.model.blocks import KVCache
from butterfly.model.stage_sessions import Step, stepping
from tests.tolerance import reduction_length, rounding_bound

DECODERS = ("gpt2", "llama")


@pytest.fixture(scope="module")
def model(saved: Callable[[str], Path]) -> Callable[[str], Any]:
    built: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in built:
            source = ModelSource(f"hf:{saved(family)}")
            built[family] = source.build_layers(0, source.describe().num_layers)
        return built[family]

    return get


class Session:
    """One session through all layers in this process, step by step."""

    def __init__(self, layers: Any) -> None:
        self.layers = layers
        self.state: dict[str, Any] = {}
        self.position = 0

    def step(self, tokens: list[list[int]], keep: tuple[int, ...] = ()) -> torch.Tensor:
        """Next-token logits ``(rows, vocab)`` for a step of ``tokens`` (-1: padding)."""
        step = Step(self.position, self.state)
        if keep:
            step.keep_rows(keep)
        with torch.inference_mode(), stepping(step):
            logits: torch.Tensor = self.layers(torch.tensor(tokens))
        self.position += len(tokens[0])
        return logits[:, -1]


def _alone(layers: Any, prompt: list[int], follow: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt, then after each following token, in a session of its own."""
    session = Session(layers)
    out = [session.step([prompt])[0]]
    out += [session.step([[token]])[0] for token in follow]
    return out


A, A_NEXT = [5, 9, 14, 3], [7, 21, 8, 30]
B, B_NEXT = [40, 41, 42, 43, 44, 45], [12, 13, 60]
PAD = -1
#: Columns of the session ``_together`` builds: a's prompt and steps, b's prompt.
SESSION_COLUMNS = len(A) + len(A_NEXT) + len(B) - 1


def _together(session: Session) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """a starts alone; b joins at a's third step; a leaves after its fifth; b goes on."""
    got_a = [session.step([A])[0], session.step([[A_NEXT[0]]])[0]]
    # b joins: its prompt, and a's next token padded on the right.
    joined = session.step([[A_NEXT[1], *[PAD] * (len(B) - 1)], B])
    got_a.append(joined[0])
    got_b = [joined[1]]
    for i in (2, 3):
        both = session.step([[A_NEXT[i]], [B_NEXT[i - 2]]])
        got_a.append(both[0])
        got_b.append(both[1])
    got_b.append(session.step([[B_NEXT[2]]], keep=(1,))[0])  # a's row has left
    return got_a, got_b


@pytest.mark.parametrize("family", DECODERS)
def test_a_row_joining_a_running_session_computes_what_it_computes_alone(
    family: str, model: Callable[[str], Any]
) -> None:
    layers = model(family)
    got_a, got_b = _together(Session(layers))
    for got, alone in ((got_a, _alone(layers, A, A_NEXT)), (got_b, _alone(layers, B, B_NEXT))):
        assert len(got) == len(alone)
        for g, e in zip(got, alone, strict=True):
            # Alone and together sum over other sequence lengths: equal up to rounding.
            bound = rounding_bound(e, reduction_length(family, SESSION_COLUMNS))
            torch.testing.assert_close(g, e, rtol=0, atol=bound)


@pytest.mark.parametrize("family", DECODERS)
def test_replaying_the_padded_rectangle_gives_each_rows_last_logits(
    family: str, model: Callable[[str], Any]
) -> None:
    layers = model(family)
    session = Session(layers)
    got_a, got_b = _together(session)
    # What the coordinator keeps before a's row left: padding where a row had no token.
    width = len(A) + 1  # the columns before b joined
    rows = [
        [*A, A_NEXT[0], A_NEXT[1], *[PAD] * (len(B) - 1), A_NEXT[2], A_NEXT[3]],
        [*[PAD] * width, *B, B_NEXT[0], B_NEXT[1]],
    ]
    replay = Session(layers).step(rows)
    # One step of every column against step by step: equal up to rounding only.
    length = reduction_length(family, len(rows[0]))
    torch.testing.assert_close(replay[0], got_a[-1], rtol=0, atol=rounding_bound(got_a[-1], length))
    torch.testing.assert_close(replay[1], got_b[-2], rtol=0, atol=rounding_bound(got_b[-2], length))


def test_a_step_with_fewer_rows_than_the_session_is_refused(model: Callable[[str], Any]) -> None:
    session = Session(model("llama"))
    session.step([A, A])
    with pytest.raises(
        ValueError, match="a step of 1 rows for a session of 2: rows leave only by keep_rows"
    ):
        session.step([[7]])


def test_keeping_rows_the_session_does_not_have_is_refused() -> None:
    cache = KVCache()
    cache.layout(0, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"rows \[0, 2\] are not all among the session's 2"):
        cache.keep_rows([0, 2])
