"""The scheduler through the blocking API, on real worker processes."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from butterfly import Butterfly, LocalCluster, RequestTimeout, TaskStatus
from butterfly.errors import ApiError
from butterfly.model.zoo import mlp

pytestmark = pytest.mark.slow


def reference(x: torch.Tensor) -> torch.Tensor:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return mlp()(x)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlp_cluster() -> Iterator[LocalCluster]:
    with LocalCluster("butterfly.model.zoo:mlp", workers=3, threads=1) as cluster:
        yield cluster


def test_thousand_concurrent_requests_from_eight_threads_each_get_their_own_answer(
    mlp_cluster: LocalCluster,
) -> None:
    inputs = torch.randn(1000, 1, 64, generator=torch.Generator().manual_seed(3))
    expected = [reference(x) for x in inputs]
    outputs: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    with Butterfly.connect(
        mlp_cluster.addresses, config={"scheduling": {"max_in_flight": 16}}
    ) as b:

        def work(thread: int) -> None:
            try:
                mine = range(thread, 1000, 8)
                handles = {i: b.submit(inputs[i]) for i in mine}
                for i, handle in handles.items():
                    outputs[i] = handle.result(timeout=120)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert errors == []
        assert b.metrics().requests_completed == 1000
    assert sorted(outputs) == list(range(1000))
    for i in range(1000):
        assert torch.equal(outputs[i], expected[i]), i


def test_task_handle_result_status_and_cancel() -> None:
    with Butterfly.local(
        "tests.models:slow_mlp", workers=2, config={"scheduling": {"max_in_flight": 1}}
    ) as b:
        running = b.submit(torch.zeros(1, 64))
        queued = b.submit(torch.zeros(1, 64))
        with pytest.raises(
            RequestTimeout,
            match=f"task {running.task_id} has not finished within 0.2 s; it is still running",
        ):
            running.result(timeout=0.2)
        assert queued.status() is TaskStatus.QUEUED
        assert queued.cancel() is True
        with pytest.raises(ApiError, match="was cancelled"):
            queued.result()
        assert running.result(timeout=30).shape == (1, 64)
        assert running.status() is TaskStatus.COMPLETED
        assert running.done()


def test_infer_many_through_real_workers(mlp_cluster: LocalCluster) -> None:
    xs = [torch.randn(n, 64) for n in (1, 4, 2)]
    with Butterfly.connect(mlp_cluster.addresses) as b:
        outputs = b.infer_many(xs)
    for x, y in zip(xs, outputs, strict=True):
        assert torch.equal(y, reference(x))
