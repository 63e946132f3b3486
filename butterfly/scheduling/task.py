"""Tasks: one caller's request, from submission to its outcome."""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs
import trio

from ..errors import ButterflyError
from ..protocol import WireTensor

__all__ = ["InferenceTask", "TaskStatus"]


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
