"""Tasks: one caller's request, from submission to its outcome."""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs
import numpy as np
import trio

from ..errors import ButterflyError
from ..protocol import WireTensor

__all__ = ["InferenceTask", "SessionState", "TaskStatus"]


class TaskStatus(enum.StrEnum):
    """Where a task is. Completed, Failed and Cancelled are final."""

    PENDING = "pending"  # created, not yet admitted
    QUEUED = "queued"  # admitted, waiting for a pipeline slot
    RUNNING = "running"  # its activations are in the pipeline
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED)


@attrs.define(eq=False)
class SessionState:
    """A generation session as the scheduler sees it: its tokens, and what the stages cached.

    A step sends only the tokens the stages have not cached when their caches were built
    on the current placement; after a failure or a new placement it replays them all.
    """

    session_id: int
    #: ``(batch, n)`` int64: the prompt and every token generated so far, the step's included.
    tokens: np.ndarray
    #: Placement epoch whose stages cache the first ``cached`` tokens (0: nothing cached).
    epoch: int = 0
    cached: int = 0
    #: A step was sent before: sending from position 0 again is a replay.
    started: bool = False
    #: The rows of the stages' cache that ``tokens``' first rows are (empty: all of them,
    #: in order): set when generations leave the session, until a step succeeds.
    keep: tuple[int, ...] = ()
    #: Verified under ``spot_check`` (drawn at its first step; None before).
    verified: bool | None = None


@attrs.define(eq=False)
class InferenceTask:
    """One request. ``deadline`` is on trio's clock; ``None`` means no deadline."""

    task_id: int
    input: WireTensor
    priority: int = 0
    deadline: float | None = None
    submitted_at: float = 0.0
    status: TaskStatus = TaskStatus.PENDING
    result: WireTensor | None = None
    error: ButterflyError | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    #: Called once, in the trio thread, when the task reaches a final status.
    on_done: list[Callable[[InferenceTask], None]] = attrs.field(factory=list)
    #: Set for a step of a generation session (its input is ``session.tokens``).
    session: SessionState | None = None

    @property
    def rows(self) -> int:
        return self.input.shape[0]

    def finish(
        self,
        status: TaskStatus,
        *,
        result: WireTensor | None = None,
        error: ButterflyError | None = None,
    ) -> bool:
        """Move to a final status once; later calls are ignored (returns whether this one won)."""
        if self.status.final:
            return False
        self.status, self.result, self.error = status, result, error
        self.done.set()
        for callback in self.on_done:
            callback(self)
        return True
