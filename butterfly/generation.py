"""Token generation over the pipeline: sessions whose KV caches stay on the stages.

    prompt ─▶ step 0: every prompt token through every stage (each stage caches its keys
              and values for the session) ─▶ logits of the last position ─▶ next token
    token  ─▶ step k: one token per row through every stage ─▶ logits ─▶ next token …

Only the new token's hidden state crosses the network per step. The coordinator keeps
the session's tokens: when a worker is lost, or its caches were evicted, the step is
re-run on the current placement by replaying every token so far, and generation goes
on as if nothing happened (greedy output is the same). The model's first stage must take
``(batch, seq)`` int64 token ids and its last return logits ``(batch, seq', vocab)``
(the ``hf:`` decoders do); a batch is unpadded (every row the same length).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator, Iterable

import attrs
import numpy as np
import torch
import trio

from .coordination import CoordinationService
from .errors import ApiError, ModelError
from .model.tensors import torch_from_wire
from .protocol import EndSession, array_to_wire
from .scheduling import SchedulingService, SessionState

__all__ = ["SamplingParams", "check_token_ids", "next_tokens", "stream_tokens"]

_session_ids = itertools.count(1)


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
    if (array < 0).any():
        raise ApiError(
            "input_ids holds negative ids (padding): generation takes unpadded batches, "
            "every row the same length"
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
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the more likely ones already reach top_p (the first always stays).
        drop = cumulative - ordered.softmax(dim=-1) >= params.top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


async def stream_tokens(
    scheduling: SchedulingService,
    coordination: CoordinationService,
    prompt: np.ndarray,
    params: SamplingParams,
    *,
    timeout: float,
) -> AsyncGenerator[np.ndarray, None]:
    """Yield the next ``(batch,)`` tokens, step by step, until ``max_new_tokens`` or every row
    stopped (rows that stopped repeat their stop token). Each step may take ``timeout`` s."""
    session = SessionState(session_id=next(_session_ids), tokens=prompt)
    generator = torch.Generator()
    generator.manual_seed(
        params.seed if params.seed is not None else int(np.random.randint(1 << 62))
    )
    finished = np.zeros(prompt.shape[0], dtype=bool)
    last = np.zeros(prompt.shape[0], dtype=np.int64)
    try:
        for _ in range(params.max_new_tokens):
            task = scheduling.submit_task(
                array_to_wire(session.tokens), timeout=timeout, session=session
            )
            logits = torch_from_wire(await scheduling.wait(task))
            if logits.ndim != 3 or logits.shape[0] != prompt.shape[0]:
                raise ModelError(
                    f"generation needs logits (batch, seq, vocab) from the last stage; got "
                    f"shape {tuple(logits.shape)}"
                )
            chosen = next_tokens(logits[:, -1], params, generator).numpy()
            chosen = np.where(finished, last, chosen)
            last = chosen
            finished |= np.isin(chosen, list(params.stop))
            session.tokens = np.concatenate([session.tokens, chosen[:, None]], axis=1)
            yield chosen
            if finished.all():
                return
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await coordination.send_all(
                EndSession(session=session.session_id, origin=coordination.node_id)
            )
