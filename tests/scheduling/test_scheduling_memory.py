"""The scheduler through the public async API, with in-process workers over the in-memory transport."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trio

from butterfly import AsyncButterfly, TaskStatus
from butterfly.errors import ApiError, ComputeError, RequestTimeout, SchedulingError
from butterfly.transport import MemoryNetwork
from tests.inmemory import FAST, local_forward, start_workers
from tests.tolerance import rounding_bound
from tests.waiting import wait_until


def config(**scheduling: object) -> dict[str, object]:
    return {**FAST, "scheduling": scheduling}


async def test_priority_policy_runs_higher_priority_first() -> None:
    net = MemoryNetwork()
    order: list[str] = []
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "tests.models:slow_mlp", n=1)
        cfg = config(scheduler_type="priority", max_in_flight=1)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=cfg) as b:
            blocker = await b.submit(torch.zeros(1, 64))  # occupies the only slot
            await wait_until(lambda: blocker.status() is TaskStatus.RUNNING, what="blocker runs")
            handles = {
                name: await b.submit(torch.zeros(1, 64), priority=p)
                for name, p in [("low", 0), ("high", 9), ("mid", 5)]
            }

            async def wait(name: str) -> None:
                await handles[name].result()
                order.append(name)

            async with trio.open_nursery() as waits:
                for name in handles:
                    waits.start_soon(wait, name)
            await blocker.result()
        nursery.cancel_scope.cancel()
    assert order == ["high", "mid", "low"]


async def test_fifo_policy_runs_in_submission_order_whatever_the_priority() -> None:
    net = MemoryNetwork()
    order: list[int] = []
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "tests.models:slow_mlp", n=1)
        async with AsyncButterfly.connect(
            ["mem://w0"], transport=net, config=config(max_in_flight=1)
        ) as b:
            handles = [await b.submit(torch.zeros(1, 64), priority=p) for p in (0, 9, 5)]

            async def wait(i: int) -> None:
                await handles[i].result()
                order.append(i)

            async with trio.open_nursery() as waits:
                for i in range(3):
                    waits.start_soon(wait, i)
        nursery.cancel_scope.cancel()
    assert order == [0, 1, 2]


async def test_task_moves_from_queued_to_running_to_completed() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "tests.models:slow_mlp", n=2)
        async with AsyncButterfly.connect(
            ["mem://w0"], transport=net, config=config(max_in_flight=1)
        ) as b:
            first = await b.submit(torch.zeros(1, 64))
            second = await b.submit(torch.zeros(1, 64))
            await wait_until(lambda: first.status() is TaskStatus.RUNNING, what="first runs")
            assert second.status() is TaskStatus.QUEUED
            await second.result()
            assert (first.status(), second.status()) == (TaskStatus.COMPLETED, TaskStatus.COMPLETED)
        nursery.cancel_scope.cancel()


async def test_cancel_while_queued_means_it_never_runs() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        workers = await start_workers(nursery, net, "tests.models:slow_mlp", n=1)
        async with AsyncButterfly.connect(
            ["mem://w0"], transport=net, config=config(max_in_flight=1)
        ) as b:
            running = await b.submit(torch.zeros(1, 64))
            queued = await b.submit(torch.zeros(1, 64))
            await wait_until(lambda: running.status() is TaskStatus.RUNNING, what="first runs")
            assert queued.cancel() is True
            assert queued.status() is TaskStatus.CANCELLED
            with pytest.raises(ApiError, match=f"task {queued.task_id} was cancelled"):
                await queued.result()
            await running.result()
            await trio.sleep(0.1)
            assert workers[0].computed == 1
        nursery.cancel_scope.cancel()


async def test_cancel_while_running_stops_the_remaining_stages_on_the_workers() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        w0, w1, w2 = await start_workers(nursery, net, "tests.models:slow_mlp", n=3)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            handle = await b.submit(torch.zeros(1, 64))
            # Stage 0 is done: the request is in stage 1's 1.5 s pause.
            await wait_until(lambda: w0.computed == 1, what="stage 0 computed")
            assert handle.status() is TaskStatus.RUNNING
            assert handle.cancel() is True
            # Stage 1 finishes its pause, finds the request cancelled, and drops it.
            await wait_until(lambda: w1.dropped == 1, what="stage 1 dropped the request")
            assert (w0.computed, w1.computed, w2.computed) == (1, 1, 0)
            assert w1.dropped == 1
            assert handle.cancel() is False  # already final
        nursery.cancel_scope.cancel()


async def test_task_past_its_deadline_fails_with_request_timeout() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "tests.models:slow_mlp", n=2)
        async with AsyncButterfly.connect(
            ["mem://w0"], transport=net, config=config(max_in_flight=1)
        ) as b:
            running = await b.submit(torch.zeros(1, 64), timeout=0.2)
            queued = await b.submit(torch.zeros(1, 64), timeout=0.2)
            for handle in (running, queued):
                with pytest.raises(RequestTimeout, match=r"did not complete within 0.2 s"):
                    await handle.result()
                assert handle.status() is TaskStatus.FAILED
            assert b.metrics().requests_failed == {"timeout": 2}
        nursery.cancel_scope.cancel()


async def test_micro_batched_requests_of_different_batch_sizes_get_their_own_rows() -> None:
    net = MemoryNetwork()
    cfg = config(dispatch_batch_size=16, max_batch_wait_ms=300)
    async with trio.open_nursery() as nursery:
        workers = await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=2)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=cfg) as b:
            gen = torch.Generator().manual_seed(0)
            xs = [torch.randn(n, 64, generator=gen) for n in (1, 3, 2, 5)]
            outputs = await b.infer_many(xs)
            assert workers[0].computed == 1  # one forward for all four requests
            expected = local_forward(torch.cat(xs)).split([1, 3, 2, 5])
            # Not bitwise: the full suite once gave a last-bit difference here (CI, after the
            # e2e tests; never alone, nor under load, nor after any one e2e module: MKL picks
            # kernels by more than shape — 4-byte misaligned inputs differ by 3e-8 here).
            # Rows swapped between requests would differ by ~0.1; rounding is bounded by
            # eps × max|y| × the reduction lengths (three 64-wide Linear layers).
            for out, exp in zip(outputs, expected, strict=True):
                assert out.shape == exp.shape
                bound = rounding_bound(exp, 3 * 64)
                torch.testing.assert_close(out, exp, rtol=0, atol=bound)
        nursery.cancel_scope.cancel()


async def test_requests_of_different_shapes_are_not_batched_together() -> None:
    net = MemoryNetwork()
    cfg = config(dispatch_batch_size=16, max_batch_wait_ms=100)
    async with trio.open_nursery() as nursery:
        workers = await start_workers(nursery, net, "butterfly.model.zoo:small_transformer", n=1)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=cfg) as b:
            xs = [torch.randn(1, 4, 256), torch.randn(1, 6, 256), torch.randn(2, 4, 256)]
            outputs = await b.infer_many(xs)
            assert workers[0].computed == 2  # (1,4,·)+(2,4,·) together, (1,6,·) alone
            assert [tuple(o.shape) for o in outputs] == [(1, 4, 256), (1, 6, 256), (2, 4, 256)]
        nursery.cancel_scope.cancel()


async def test_a_bad_input_in_a_batch_fails_only_its_own_request() -> None:
    net = MemoryNetwork()
    cfg = config(dispatch_batch_size=8, max_batch_wait_ms=200)
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "tests.models:raising", n=1)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=cfg) as b:
            good = [await b.submit(torch.ones(1, 64) * i) for i in range(3)]
            bad = await b.submit(torch.full((1, 64), float("nan")))
            with pytest.raises(ComputeError, match="NaN in activation"):
                await bad.result()
            for handle in good:
                assert (await handle.result()).shape == (1, 64)
        nursery.cancel_scope.cancel()


async def test_infer_many_returns_outputs_in_order() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=3)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            xs = [np.full((1, 64), i, np.float32) for i in range(20)]
            outputs = await b.infer_many(xs)
            for x, y in zip(xs, outputs, strict=True):
                np.testing.assert_array_equal(y, local_forward(torch.from_numpy(x)).numpy())
        nursery.cancel_scope.cancel()


async def test_infer_many_refuses_a_single_tensor() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=1)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            with pytest.raises(ApiError, match="expects a list of inputs, got Tensor"):
                await b.infer_many(torch.zeros(3, 64))
        nursery.cancel_scope.cancel()


async def test_submit_validates_priority_and_timeout() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=1)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            with pytest.raises(ApiError, match="priority must be an int, got 'high'"):
                await b.submit(torch.zeros(1, 64), priority="high")  # type: ignore[arg-type]
            with pytest.raises(
                ApiError, match="timeout must be a positive number of seconds or None, got 0"
            ):
                await b.submit(torch.zeros(1, 64), timeout=0)
        nursery.cancel_scope.cancel()


async def test_unknown_task_id_is_a_scheduling_error() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=1)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            with pytest.raises(SchedulingError, match="unknown task id 999"):
                b._system.scheduling.query_status(999)
        nursery.cancel_scope.cancel()


async def test_pipelining_keeps_every_stage_busy() -> None:
    """4 requests through 3 stages of 0.5 s each: 6 s one at a time, 3 s when pipelined.

    The stages sleep instead of computing, so the bound holds on a loaded machine too.
    """
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "tests.models:sleepy", n=3)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            start = trio.current_time()
            await b.infer_many([torch.zeros(1, 64) for _ in range(4)])
            elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert 3.0 <= elapsed < 4.5
