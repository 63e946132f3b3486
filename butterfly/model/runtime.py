"""The stage runtime: one contiguous run of layers, computed off the event loop."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence

import torch
import trio
from torch import nn

from ..config import GenerationConfig
from ..protocol import WireTensor
from .stage_sessions import SessionKey, SessionStore, stepping
from .tensors import torch_from_wire, torch_to_wire

__all__ = ["INLINE_STEP_S", "StageRuntime"]

#: A one-token generation step whose previous run took less than this is computed on the
#: event loop: handing it to a worker thread and back costs more than such a step (about
#: 0.4 ms per stage and token on 2 cores, measured with ``bench.decode``), and the loop's
#: heartbeats are delayed by no more than this.
INLINE_STEP_S = 0.01


class StageRuntime:
    """Runs layers ``[start, stop)`` in a worker thread under ``torch.inference_mode()``.

    ``limiter`` is shared by every stage on the same device, so stages of one worker
    take turns on it instead of oversubscribing its cores. Short one-token generation
    steps run on the event loop instead (:data:`INLINE_STEP_S`).
    """

    def __init__(
        self,
        layers: nn.Sequential,
        *,
        start: int,
        stop: int,
        device: torch.device,
        limiter: trio.CapacityLimiter,
        max_bytes: int,
        in_thread: bool = True,
        sessions: SessionStore | None = None,
    ) -> None:
        self.layers = layers
        self.start = start
        self.stop = stop
        self.device = device
        self.limiter = limiter
        self.max_bytes = max_bytes
        #: False computes on the event loop: only for deterministic simulations in tests,
        #: where a thread's real duration must not decide what happens next.
        self.in_thread = in_thread
        #: Where generation sessions keep their state between steps (see :mod:`.stage_sessions`).
        self.sessions = sessions or SessionStore.from_config(GenerationConfig())
        #: Rows and duration of the last one-token session step (unknown at first: in a
        #: thread).
        self.last_step: tuple[int, float] = (0, math.inf)

    async def forward(
        self,
        tensor: WireTensor,
        *,
        first: int | None = None,
        session: SessionKey | None = None,
        position: int = 0,
        keep: Sequence[int] = (),
        spent: list[float] | None = None,
    ) -> WireTensor:
        """Decode, compute and encode one activation, in a worker thread (or, for a short
        one-token generation step, on the event loop: see :data:`INLINE_STEP_S`).

        ``first`` is the layer to start at (a request resuming from a checkpoint inside
        this stage); by default the stage's first layer. ``session`` makes this a step of
        a generation session whose tokens start at ``position`` (dimension 1 of the
        tensor is the sequence): the layers see its state (see :mod:`.stage_sessions`); ``keep``
        (empty: all) names the rows of that state that stay, in order, before the step.
        With ``spent``, the seconds of the computation itself (not of the wait for the
        device) are appended to it.
        """
        skip = 0 if first is None else first - self.start
        if not 0 <= skip < self.stop - self.start:
            raise ValueError(
                f"layer {first} is not in this stage's layers {self.start}..{self.stop - 1}"
            )
        compute = functools.partial(self._compute, tensor, skip, session, position, tuple(keep))
        if spent is not None:
            compute = functools.partial(_measured, compute, spent)
        if not self.in_thread:
            return compute()
        rows = tensor.shape[0] if tensor.shape else 0
        if session is None or position == 0 or tuple(tensor.shape[1:2]) != (1,):
            return await trio.to_thread.run_sync(compute, limiter=self.limiter)
        timed = functools.partial(self._timed, compute, rows)
        # Inline only what is known to be short: no more rows than a step that was.
        last_rows, last_s = self.last_step
        if last_s < INLINE_STEP_S and rows <= last_rows:
            try:
                self.limiter.acquire_nowait()
            except trio.WouldBlock:
                pass  # another computation holds the cores: wait for them in a thread
            else:
                try:
                    return timed()
                finally:
                    self.limiter.release()
        return await trio.to_thread.run_sync(timed, limiter=self.limiter)

    def _timed(self, compute: functools.partial[WireTensor], rows: int) -> WireTensor:
        begin = time.perf_counter()
        try:
            return compute()
        finally:
            self.last_step = (rows, time.perf_counter() - begin)

    def _compute(
        self,
        tensor: WireTensor,
        skip: int,
        session: SessionKey | None,
        position: int,
        keep: tuple[int, ...],
    ) -> WireTensor:
        with torch.inference_mode():
            x = torch_from_wire(tensor, device=self.device, max_bytes=self.max_bytes)
            layers = self.layers[skip:] if skip else self.layers
            if session is None:
                y = layers(x)
            else:
                tokens = x.shape[1] if x.ndim > 1 else 1
                step = self.sessions.begin(session, position, tokens)
                try:
                    if keep and position:
                        step.keep_rows(keep)
                    with stepping(step):
                        y = layers(x)
                except BaseException:
                    self.sessions.discard(session)
                    raise
                self.sessions.commit(session, tokens)
            if not isinstance(y, torch.Tensor):
                raise TypeError(
                    f"layers {self.start}..{self.stop - 1} returned {type(y).__name__}, not a tensor"
                )
            return torch_to_wire(y)


def _measured(compute: Callable[[], WireTensor], spent: list[float]) -> WireTensor:
    begin = time.perf_counter()
    try:
        return compute()
    finally:
        spent.append(time.perf_counter() - begin)
