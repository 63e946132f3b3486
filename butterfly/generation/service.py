"""Token generation over the pipeline: sessions whose KV caches stay on the stages.

    prompt ─▶ step 0: every prompt token through every stage (each stage caches its keys
              and values for the session) ─▶ logits of the last position ─▶ next token
    token  ─▶ step k: one token per row through every stage ─▶ logits ─▶ next token …

Only the new token's hidden state crosses the network per step. The coordinator keeps
the session's tokens: when a worker is lost, or its caches were evicted, the step is
re-run on the current placement by replaying every token so far, and generation goes
on as if nothing happened (greedy output is the same). The model's first stage must take
``(batch, seq)`` int64 token ids and its last return logits ``(batch, seq', vocab)``
(the ``hf:`` decoders do). Rows of a prompt may differ in length: negative ids are
padding (on either side), and each row generates what it would alone.

*Continuous batching.* With micro-batching on, generations share a session in the
pipeline, rows stacked: a session is a rectangle of rows × columns in which ``-1`` marks
padding. A generation that arrives while a session runs joins it at its next step: that
step carries the newcomer's prompt and, for the other rows, their next token padded on
the right; the newcomer's row is padded in the columns before it. The stages mask
padding out of attention and count positions per row (``model/blocks.py``
``KVCache``), so every row computes what it would compute alone. Rows of finished
generations leave at the next step (``Activation.keep``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import AsyncGenerator

import attrs
import numpy as np
import torch
import trio

from ..config import SchedulingConfig
from ..coordination import CoordinationService
from ..errors import ApiError, ButterflyError, ModelError, SchedulingError
from ..metrics.events import FirstToken, TokenGenerated
from ..model.tensors import torch_from_wire
from ..protocol import EndSession, array_to_wire
from ..scheduling import SchedulingService, SessionState
from .sampling import SamplingParams, next_tokens

__all__ = ["GenerationService"]

log = logging.getLogger(__name__)

_session_ids = itertools.count(1)


@attrs.define(eq=False)
class _Member:
    """One caller's generation inside a group: its rows, sampling, and where tokens go."""

    prompt: np.ndarray
    params: SamplingParams
    timeout: float
    out: trio.MemorySendChannel[np.ndarray | ButterflyError]
    generator: torch.Generator = attrs.field(factory=torch.Generator)
    rows: slice = slice(0)
    steps: int = 0
    #: False once the caller has all its tokens or stopped listening.
    active: bool = True
    #: When it joined, then when its latest tokens came (trio time).
    last_at: float = attrs.field(factory=trio.current_time)
    finished: np.ndarray = attrs.field(init=False)
    last: np.ndarray = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        seed = self.params.seed
        self.generator.manual_seed(seed if seed is not None else int(np.random.randint(1 << 62)))
        self.finished = np.zeros(self.prompt.shape[0], dtype=bool)
        self.last = np.zeros(self.prompt.shape[0], dtype=np.int64)

    def take(self, logits: torch.Tensor) -> np.ndarray:
        """Choose this member's next tokens from its rows' last logits and hand them over."""
        if not self.active:
            return self.last  # rows of a member that is done idle on their last token
        chosen = next_tokens(logits, self.params, self.generator).numpy()
        chosen = np.where(self.finished, self.last, chosen)
        self.last = chosen
        self.finished |= np.isin(chosen, list(self.params.stop))
        self.steps += 1
        self.deliver(chosen)
        if self.steps >= self.params.max_new_tokens or self.finished.all():
            self.end()
        return chosen

    def deliver(self, item: np.ndarray | ButterflyError) -> None:
        try:
            self.out.send_nowait(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.active = False  # the caller stopped listening

    def end(self) -> None:
        self.active = False
        self.out.close()


@attrs.define(eq=False)
class _Group:
    """Generations sharing one session in the pipeline, rows stacked in member order."""

    #: In the session, in row order.
    members: list[_Member] = attrs.field(factory=list)
    #: Waiting for the next step to join.
    joining: list[_Member] = attrs.field(factory=list)

    def load(self) -> int:
        """Rows of the generations still running or about to join."""
        return sum(m.prompt.shape[0] for m in (*self.members, *self.joining) if m.active)


def _padded(prompts: list[np.ndarray], width: int) -> np.ndarray:
    """Prompts stacked as rows, each padded with -1 on the right to ``width`` columns."""
    rows = np.full((sum(p.shape[0] for p in prompts), width), -1, dtype=np.int64)
    start = 0
    for p in prompts:
        rows[start : start + p.shape[0], : p.shape[1]] = p
        start += p.shape[0]
    return rows


class GenerationService:
    """Runs generation sessions for the coordinator.

    Without micro-batching every generation is a session of its own (concurrent sessions
    are pipelined, each step its own request). With it (``scheduling.dispatch_batch_size``
    > 1), generations share a session, up to ``dispatch_batch_size`` rows: those arriving
    within ``max_batch_wait_ms`` start it together, later ones join it at its next step
    (see the module's docstring). Each step is one request for all of them, and each
    caller samples its own rows with its own settings.
    """

    def __init__(
        self,
        scheduling: SchedulingService,
        coordination: CoordinationService,
        config: SchedulingConfig,
    ) -> None:
        self.scheduling = scheduling
        self.metrics = scheduling.metrics
        self.coordination = coordination
        self.config = config
        #: Running sessions that newcomers may join (with micro-batching on).
        self._groups: list[_Group] = []
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def stream(
        self, prompt: np.ndarray, params: SamplingParams, *, timeout: float
    ) -> AsyncGenerator[np.ndarray, None]:
        """Yield the next ``(batch,)`` tokens, step by step, until ``max_new_tokens`` or every
        row stopped (rows that stopped repeat their stop token). Each step may take
        ``timeout`` seconds."""
        send, receive = trio.open_memory_channel[np.ndarray | ButterflyError](math.inf)
        member = _Member(prompt, params, timeout, send)
        self._join(member)
        try:
            async with receive:
                async for item in receive:
                    if isinstance(item, ButterflyError):
                        raise item
                    yield item
        finally:
            member.active = False

    def _join(self, member: _Member) -> None:
        """Into the first running session with room for its rows, or a new one."""
        limit = self.config.dispatch_batch_size
        rows = member.prompt.shape[0]
        group = next((g for g in self._groups if g.load() + rows <= limit), None)
        if group is None:
            group = _Group()
            if limit > 1:
                self._groups.append(group)
            assert self._nursery is not None
            self._nursery.start_soon(self._drive, group)
        group.joining.append(member)

    async def _drive(self, group: _Group) -> None:
        if self.config.dispatch_batch_size > 1:
            await trio.sleep(self.config.max_batch_wait_ms / 1000)
        session = SessionState(session_id=next(_session_ids), tokens=np.zeros((0, 0), np.int64))
        #: Each row's latest token: what it feeds at the next step.
        last = np.zeros(0, dtype=np.int64)
        try:
            while True:
                staying = [m for m in group.members if m.active]
                newcomers, group.joining = group.joining, []
                newcomers = [m for m in newcomers if m.active]
                if not staying and not newcomers:
                    break
                if not staying and session.tokens.size:
                    # Everyone before has finished: the newcomers start a session afresh.
                    assert self._nursery is not None
                    self._nursery.start_soon(self._end, session)
                    session = SessionState(
                        session_id=next(_session_ids), tokens=np.zeros((0, 0), np.int64)
                    )
                last = self._admit(group, session, staying, newcomers, last)
                task = self.scheduling.submit_task(
                    array_to_wire(session.tokens),
                    timeout=max(m.timeout for m in group.members),
                    session=session,
                )
                logits = torch_from_wire(await self.scheduling.wait(task))
                if logits.ndim != 3 or logits.shape[0] != session.tokens.shape[0]:
                    raise ModelError(
                        f"generation needs logits (batch, seq, vocab) from the last stage; "
                        f"got shape {tuple(logits.shape)}"
                    )
                now = trio.current_time()
                for m in group.members:
                    if m.active:
                        event = FirstToken if m.steps == 0 else TokenGenerated
                        rows = m.prompt.shape[0]
                        self.metrics.emit(event(task.task_id, now, now - m.last_at, rows))
                        m.last_at = now
                    last[m.rows] = m.take(logits[m.rows, -1])
        except ButterflyError as exc:
            self._fail(group, exc)
        except Exception as exc:  # a bug must fail these generations, not the client
            log.exception("generation session %d failed unexpectedly", session.session_id)
            self._fail(group, SchedulingError(f"generation failed on an internal error: {exc!r}"))
        finally:
            # No longer joinable (a group that is in the list runs, and takes newcomers).
            if group in self._groups:
                self._groups.remove(group)
            for member in (*group.members, *group.joining):
                if member.active:  # cancelled (the client is closing): say so, not a short answer
                    member.deliver(ApiError("the client closed before the generation finished"))
                member.out.close()
            with trio.CancelScope(shield=True):
                await self._end(session)

    @staticmethod
    def _admit(
        group: _Group,
        session: SessionState,
        staying: list[_Member],
        newcomers: list[_Member],
        last: np.ndarray,
    ) -> np.ndarray:
        """Lay out the next step in ``session.tokens``: rows of finished generations leave,
        the others feed their latest token, newcomers their prompt (padded to one width);
        the new ``last``."""
        kept = [r for m in staying for r in range(m.rows.start, m.rows.stop)]
        width = max([1, *(m.prompt.shape[1] for m in newcomers)])
        columns = session.tokens.shape[1]
        old = np.full((len(kept), columns + width), -1, dtype=np.int64)
        old[:, :columns] = session.tokens[kept]
        old[:, columns] = last[kept]
        new = np.full((sum(m.prompt.shape[0] for m in newcomers), columns + width), -1, np.int64)
        new[:, columns:] = _padded([m.prompt for m in newcomers], width)
        session.tokens = np.concatenate([old, new])
        # Which of the stages' cached rows stay (empty: all of them, in order).
        session.keep = () if kept == list(range(len(last))) else tuple(kept)
        start = 0
        for member in (*staying, *newcomers):
            member.rows = slice(start, start + member.prompt.shape[0])
            start = member.rows.stop
        group.members = [*staying, *newcomers]
        return np.concatenate([last[kept], np.zeros(len(new), dtype=np.int64)])

    @staticmethod
    def _fail(group: _Group, error: ButterflyError) -> None:
        for member in (*group.members, *group.joining):
            if member.active:
                member.deliver(error)
                member.active = False

    async def _end(self, session: SessionState) -> None:
        """Free the session's caches on the workers (best effort: they also expire)."""
        if not session.started:
            return  # no step was sent: nothing is cached
        with trio.move_on_after(1):
            await self.coordination.send_all(
                EndSession(session=session.session_id, origin=self.coordination.node_id)
            )
