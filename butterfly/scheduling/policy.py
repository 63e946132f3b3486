"""Queue policies, sans-IO: which queued task runs next.

``fifo``: admission order.

``priority``: higher ``priority`` first, admission order within a priority. No
starvation: once the oldest queued task has waited ``starvation_s`` seconds it runs
next, whatever its priority. So a task waits at most ``starvation_s`` plus the time
to dispatch the tasks older than it.
"""

from __future__ import annotations

import collections
import heapq
from collections.abc import Callable
from typing import Protocol

from .task import InferenceTask, TaskStatus

__all__ = ["FifoPolicy", "Policy", "PriorityPolicy", "make_policy"]


class Policy(Protocol):
    def push(self, task: InferenceTask) -> None: ...

    def pop(self, now: float) -> InferenceTask | None:
        """The next queued task, or ``None``. Tasks no longer QUEUED are skipped."""
        ...

    def take(self, predicate: Callable[[InferenceTask], bool], now: float) -> InferenceTask | None:
        """The next queued task (in policy order) for which ``predicate`` holds, removed."""
        ...

    def __len__(self) -> int: ...


class FifoPolicy:
    def __init__(self) -> None:
        self._queue: collections.deque[InferenceTask] = collections.deque()

    def push(self, task: InferenceTask) -> None:
        self._queue.append(task)

    def pop(self, now: float) -> InferenceTask | None:
        return self.take(lambda _: True, now)

    def take(self, predicate: Callable[[InferenceTask], bool], now: float) -> InferenceTask | None:
        while self._queue and self._queue[0].status is not TaskStatus.QUEUED:
            self._queue.popleft()
        for i, task in enumerate(self._queue):
            if task.status is TaskStatus.QUEUED and predicate(task):
                del self._queue[i]
                return task
        return None

    def __len__(self) -> int:
        return sum(1 for t in self._queue if t.status is TaskStatus.QUEUED)


class PriorityPolicy:
    def __init__(self, starvation_s: float) -> None:
        self.starvation_s = starvation_s
        self._heap: list[tuple[int, int, InferenceTask]] = []
        self._by_age: collections.deque[InferenceTask] = collections.deque()
        self._queued: dict[int, InferenceTask] = {}  # the tasks still in this queue

    def push(self, task: InferenceTask) -> None:
        self._queued[task.task_id] = task
        heapq.heappush(self._heap, (-task.priority, task.task_id, task))
        self._by_age.append(task)

    def _live(self, task: InferenceTask) -> bool:
        return task.task_id in self._queued and task.status is TaskStatus.QUEUED

    def _prune(self) -> None:
        # Lazy deletion: entries of popped or cancelled tasks leave when they surface.
        while self._by_age and not self._live(self._by_age[0]):
            self._queued.pop(self._by_age.popleft().task_id, None)
        while self._heap and not self._live(self._heap[0][2]):
            self._queued.pop(heapq.heappop(self._heap)[2].task_id, None)

    def _remove(self, task: InferenceTask) -> InferenceTask:
        del self._queued[task.task_id]
        return task

    def pop(self, now: float) -> InferenceTask | None:
        self._prune()
        if not self._heap:
            return None
        oldest = self._by_age[0]
        if now - oldest.submitted_at >= self.starvation_s:
            return self._remove(oldest)
        return self._remove(heapq.heappop(self._heap)[2])

    def take(self, predicate: Callable[[InferenceTask], bool], now: float) -> InferenceTask | None:
        self._prune()
        starved = [
            t for t in self._by_age if self._live(t) and now - t.submitted_at >= self.starvation_s
        ]
        rest = (e[2] for e in sorted(self._heap, key=lambda e: (e[0], e[1])))
        for task in (*starved, *rest):
            if self._live(task) and predicate(task):
                return self._remove(task)
        return None

    def __len__(self) -> int:
        return sum(1 for t in self._queued.values() if t.status is TaskStatus.QUEUED)


def make_policy(name: str, *, starvation_s: float) -> Policy:
    if name == "priority":
        return PriorityPolicy(starvation_s)
    return FifoPolicy()
