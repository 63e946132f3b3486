"""Queue policies and micro-batching helpers, sans-IO."""

from __future__ import annotations

import numpy as np
import pytest

from butterfly.errors import ProtocolError
from butterfly.protocol import array_from_wire, array_to_wire
from butterfly.scheduling import FifoPolicy, InferenceTask, PriorityPolicy, TaskStatus
from butterfly.scheduling.batching import batch_key, concat, split


def task(
    task_id: int, priority: int = 0, submitted_at: float = 0.0, rows: int = 1
) -> InferenceTask:
    tensor = array_to_wire(np.full((rows, 4), task_id, np.float32))
    return InferenceTask(task_id, tensor, priority, None, submitted_at, TaskStatus.QUEUED)


def drain(policy: FifoPolicy | PriorityPolicy, now: float = 0.0) -> list[int]:
    out = []
    while (t := policy.pop(now)) is not None:
        out.append(t.task_id)
    return out


def test_fifo_pops_in_admission_order() -> None:
    policy = FifoPolicy()
    for i in (1, 2, 3):
        policy.push(task(i, priority=i))
    assert drain(policy) == [1, 2, 3]


def test_priority_pops_higher_first_and_fifo_within_a_priority() -> None:
    policy = PriorityPolicy(starvation_s=10)
    for tid, prio in [(1, 0), (2, 5), (3, 1), (4, 5), (5, 0)]:
        policy.push(task(tid, prio))
    assert drain(policy) == [2, 4, 3, 1, 5]


def test_priority_runs_a_starved_task_next_whatever_its_priority() -> None:
    policy = PriorityPolicy(starvation_s=10)
    policy.push(task(1, priority=0, submitted_at=0.0))
    for tid in range(2, 6):
        policy.push(task(tid, priority=9, submitted_at=5.0))
    assert policy.pop(now=9.9).task_id == 2  # type: ignore[union-attr]
    assert policy.pop(now=10.0).task_id == 1  # type: ignore[union-attr]
    assert drain(policy, now=10.0) == [3, 4, 5]


def test_cancelled_tasks_are_skipped() -> None:
    for policy in (FifoPolicy(), PriorityPolicy(starvation_s=10)):
        tasks = [task(i) for i in (1, 2, 3)]
        for t in tasks:
            policy.push(t)
        tasks[0].status = TaskStatus.CANCELLED
        assert len(policy) == 2
        assert drain(policy) == [2, 3]


def test_take_returns_the_first_match_in_policy_order() -> None:
    policy = PriorityPolicy(starvation_s=10)
    for tid, prio, rows in [(1, 0, 2), (2, 3, 1), (3, 1, 2), (4, 3, 2)]:
        policy.push(task(tid, prio, rows=rows))
    two_rows = policy.take(lambda t: t.rows == 2, now=0)
    assert two_rows is not None and two_rows.task_id == 4
    assert drain(policy) == [2, 3, 1]


def test_concat_then_split_gives_each_request_its_own_rows() -> None:
    parts = [array_to_wire(np.full((n, 3), n, np.float32)) for n in (1, 2, 3)]
    joined = concat(parts)
    assert joined.shape == (6, 3)
    for part, back in zip(parts, split(joined, [1, 2, 3]), strict=True):
        assert array_from_wire(back).tobytes() == array_from_wire(part).tobytes()


def test_split_refuses_an_output_without_the_batch_rows() -> None:
    with pytest.raises(ProtocolError, match=r"expected 6 rows for requests of \[1, 2, 3\] rows"):
        split(array_to_wire(np.zeros((5, 3), np.float32)), [1, 2, 3])


def test_batch_key_separates_dtypes_and_trailing_shapes() -> None:
    a = array_to_wire(np.zeros((1, 3), np.float32))
    assert batch_key(a) == batch_key(array_to_wire(np.zeros((5, 3), np.float32)))
    assert batch_key(a) != batch_key(array_to_wire(np.zeros((1, 4), np.float32)))
    assert batch_key(a) != batch_key(array_to_wire(np.zeros((1, 3), np.float64)))
