"""The whole coordinator + workers protocol in one process, over the in-memory transport.

Real torch compute, real services and channels; only the sockets are replaced.
The e2e tests in tests/e2e repeat the essentials with real processes and sockets.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import trio

from butterfly import AsyncButterfly
from butterfly.config import load_config
from butterfly.errors import (
    ApiError,
    ComputeError,
    CoordinationError,
    FingerprintMismatch,
    NetworkError,
    PartitionError,
    RequestTimeout,
    SchedulingError,
)
from butterfly.model import ModelSource
from butterfly.transport import MemoryNetwork
from butterfly.types import WorkerState
from butterfly.worker import WorkerService
from tests.inmemory import FAST, acquainted, local_forward, start_workers
from tests.models import heavy_ends, sleepy
from tests.waiting import wait_until


async def test_infer_through_three_workers_equals_the_local_forward() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp")
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            x = torch.randn(8, 64)
            torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
        nursery.cancel_scope.cancel()


async def test_coordinator_discovers_every_worker_from_one_address() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        workers = await start_workers(nursery, net, "butterfly.model.zoo:mlp")
        async with AsyncButterfly.connect(["mem://w2"], transport=net, config=FAST) as b:
            cluster = b.cluster()
            assert sorted(w.address for w in cluster.workers) == [
                "mem://w0",
                "mem://w1",
                "mem://w2",
            ]
            assert all(w.state is WorkerState.READY for w in cluster.workers)
            assert [s.layers for s in cluster.stages] == [range(0, 2), range(2, 4), range(4, 6)]
            assert {s.node_id for s in cluster.stages} == {w.node_id for w in workers}
            assert cluster.num_layers == 6
        nursery.cancel_scope.cancel()


async def test_numpy_input_gives_numpy_output() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=2)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            x = np.random.default_rng(0).standard_normal((2, 64), dtype=np.float32)
            y = await b.infer(x)
            assert isinstance(y, np.ndarray)
            assert y.flags.writeable
            np.testing.assert_array_equal(y, local_forward(torch.from_numpy(x)).numpy())
        nursery.cancel_scope.cancel()


async def test_concurrent_requests_each_get_their_own_answer() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp")
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            inputs = [torch.full((1, 64), float(i)) for i in range(40)]
            outputs: dict[int, torch.Tensor] = {}

            async def one(i: int) -> None:
                outputs[i] = await b.infer(inputs[i])

            async with trio.open_nursery() as requests:
                for i in range(40):
                    requests.start_soon(one, i)
            for i in range(40):
                torch.testing.assert_close(outputs[i], local_forward(inputs[i]), rtol=0, atol=0)
            assert b.metrics().requests_completed == 40
        nursery.cancel_scope.cancel()


async def test_wrong_shape_is_an_api_error_and_the_next_request_works() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=2)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            with pytest.raises(
                ApiError,
                match=r"input has shape \(2, 10\) and dtype float32; the model expects shape \(\*, \.\.\., 64\) and dtype float32",
            ):
                await b.infer(torch.zeros(2, 10))
            with pytest.raises(
                ApiError, match=r"dtype float64; the model expects .* dtype float32"
            ):
                await b.infer(np.zeros((2, 64)))
            x = torch.randn(1, 64)
            torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
        nursery.cancel_scope.cancel()


async def test_model_error_on_one_input_is_a_compute_error_and_the_cluster_keeps_serving() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "tests.models:raising")
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            with pytest.raises(
                ComputeError,
                match=r"stage 1 \(layers 2\.\.3\) on worker .* raised ValueError: NaN in activation",
            ):
                await b.infer(torch.full((1, 64), float("nan")))
            y = await b.infer(torch.ones(1, 64))
            assert y.shape == (1, 64)
        nursery.cancel_scope.cancel()


async def test_request_past_its_timeout_fails_and_is_cancelled_on_the_workers() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        workers = await start_workers(nursery, net, "tests.models:slow_mlp")
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            with pytest.raises(RequestTimeout, match=r"did not complete within 0.3 s"):
                await b.infer(torch.zeros(1, 64), timeout=0.3)
            # Every worker of the placement is told to drop request 1.
            await wait_until(
                lambda: all(any(rid == 1 for _, rid in w._cancelled) for w in workers),
                what="every worker cancelled request 1",
            )
        nursery.cancel_scope.cancel()


async def test_full_queue_raises_scheduling_error_at_once() -> None:
    net = MemoryNetwork()
    config = {**FAST, "scheduling": {"max_queue_size": 1}}
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "tests.models:slow_mlp", n=2)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            await b.submit(torch.zeros(1, 64))  # admitted when submit returns
            with pytest.raises(
                SchedulingError, match=r"queue full: 1 requests .*max_queue_size = 1"
            ):
                await b.infer(torch.zeros(1, 64))
        nursery.cancel_scope.cancel()


async def test_a_request_whose_worker_is_lost_completes_on_the_survivors() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        scopes = [await nursery.start(_cancellable_worker, net, i) for i in range(3)]
        await acquainted([s.service for s in scopes])
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:

            async def kill_middle_soon() -> None:
                # Stage 0 has computed: the request is in the middle stage's 1.5 s pause.
                await wait_until(lambda: scopes[0].service.computed == 1, what="stage 0 computed")
                scopes[1].cancel()

            nursery.start_soon(kill_middle_soon)
            x = torch.randn(1, 64)
            torch.testing.assert_close(await b.infer(x), _slow_reference(x), rtol=0, atol=0)
            cluster = b.cluster()
            assert cluster.epoch == 2
            assert len(cluster.stages) == 2
            metrics = b.metrics()
            assert metrics.requests_completed == 1
            # The request went back to assignment once; epoch 1 drained and was committed.
            phases = metrics.phase_transitions
            assert (phases["request:assignment"], phases["request:commitment"]) == (2, 1)
            assert (phases["epoch:aggregation"], phases["epoch:commitment"]) == (1, 1)
        nursery.cancel_scope.cancel()


async def test_without_retries_a_lost_worker_fails_its_request() -> None:
    net = MemoryNetwork()
    config = {**FAST, "scheduling": {"max_retries": 0}}
    async with trio.open_nursery() as nursery:
        scopes = [await nursery.start(_cancellable_worker, net, i) for i in range(3)]
        await acquainted([s.service for s in scopes])
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:

            async def kill_middle_soon() -> None:
                await wait_until(lambda: scopes[0].service.computed == 1, what="stage 0 computed")
                scopes[1].cancel()

            nursery.start_soon(kill_middle_soon)
            with pytest.raises(
                NetworkError, match=r"worker .* at mem://w1 was lost during request 1"
            ):
                await b.infer(torch.zeros(1, 64))
            x = torch.randn(1, 64)
            torch.testing.assert_close(await b.infer(x), _slow_reference(x), rtol=0, atol=0)
        nursery.cancel_scope.cancel()


CHECKPOINTS = {**FAST, "coordination": {**FAST["coordination"], "checkpoint_interval": 0.3}}


@pytest.mark.parametrize(("config", "resumed_at"), [(CHECKPOINTS, 4), (FAST, 0)])
async def test_a_rerun_after_a_loss_resumes_from_the_last_checkpoint(
    config: dict[str, object], resumed_at: int
) -> None:
    # sleepy: three stages of 0.5 s on three workers; with a 0.3 s checkpoint interval the
    # coordinator holds the inputs of layers 2 and then 4 when the last worker dies.
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        scopes = [
            await nursery.start(_cancellable_worker, net, i, "tests.models:sleepy")
            for i in range(3)
        ]
        await acquainted([s.service for s in scopes])
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:

            async def kill_last_stage_soon() -> None:
                # Once the second stage has computed, the request is in the last stage;
                # with checkpoints on, kill it once the coordinator holds layer 4's input.
                await wait_until(lambda: scopes[1].service.computed >= 1, what="stage 1 computed")
                if resumed_at:
                    await wait_until(
                        lambda: _checkpoint_layers(b) == {resumed_at},
                        what=f"the coordinator holds the checkpoint of layer {resumed_at}",
                    )
                scopes[2].cancel()

            nursery.start_soon(kill_last_stage_soon)
            x = torch.randn(1, 64)
            y = await b.infer(x)
            with torch.inference_mode():
                torch.testing.assert_close(y, sleepy()(x), rtol=0, atol=0)
            metrics = b.metrics()
            assert metrics.requests_retried == {"network": 1}
            assert metrics.requests_resumed_from_checkpoint == (1 if resumed_at else 0)
            assert [s.layers for s in b.cluster().stages] == [range(0, 3), range(3, 6)]
            # Resumed at layer 4 only the second survivor computes again; from the input, both.
            computed = [scopes[i].service.computed for i in (0, 1)]
            assert computed == ([1, 2] if resumed_at else [2, 2])
        nursery.cancel_scope.cancel()


async def test_checkpoints_keep_a_request_longer_than_the_attempt_timeout_from_being_rerun() -> (
    None
):
    # sleepy takes 1.5 s; with no word for 1.2 s an attempt is presumed lost. Checkpoints
    # arrive at about 0.5 s and 1.0 s: each proves the request is still running.
    config = {
        **CHECKPOINTS,
        "scheduling": {"attempt_timeout": 1.2},
    }
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        scopes = [
            await nursery.start(_cancellable_worker, net, i, "tests.models:sleepy")
            for i in range(3)
        ]
        await acquainted([s.service for s in scopes])
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            x = torch.randn(1, 64)
            y = await b.infer(x)
            with torch.inference_mode():
                torch.testing.assert_close(y, sleepy()(x), rtol=0, atol=0)
            assert b.metrics().requests_retried == {}
        nursery.cancel_scope.cancel()


def _checkpoint_layers(b: AsyncButterfly) -> set[int]:
    """The layers whose inputs the coordinator holds as checkpoints of running requests."""
    batches = b._system.scheduling._batches.values()
    return {batch.checkpoint.layer for batch in batches if batch.checkpoint is not None}


def _slow_reference(x: torch.Tensor) -> torch.Tensor:
    from tests.models import slow_mlp

    with torch.inference_mode():
        return slow_mlp()(x)


class _KillableWorker:
    """A worker in its own cancel scope: ``cancel()`` is the in-process SIGKILL."""

    def __init__(self, scope: trio.CancelScope, service: WorkerService) -> None:
        self.scope = scope
        self.service = service

    def cancel(self) -> None:
        self.scope.cancel()


async def _cancellable_worker(
    net: MemoryNetwork,
    i: int,
    model: str = "tests.models:slow_mlp",
    *,
    task_status: trio.TaskStatus[_KillableWorker],
) -> None:
    with trio.CancelScope() as scope:
        worker = WorkerService(
            ModelSource(model, profile=False),
            transport=net,
            listen=f"mem://w{i}",
            peers=("mem://w0",) if i else (),
            config=load_config(FAST),
        )
        async with trio.open_nursery() as inner:
            await inner.start(worker.run)
            task_status.started(_KillableWorker(scope, worker))


async def test_workers_with_different_weights_are_refused_at_connect() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "tests.models:random_mlp", n=2)
        with pytest.raises(
            FingerprintMismatch, match=r"hold different weights.*must be deterministic"
        ):
            async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST):
                pass
        nursery.cancel_scope.cancel()


async def test_nondeterministic_factory_on_one_worker_fails_the_assignment() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "tests.models:random_mlp", n=1)
        with pytest.raises(
            CoordinationError, match=r"refused placement epoch 1: .*not deterministic"
        ):
            async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST):
                pass
        nursery.cancel_scope.cancel()


async def test_no_reachable_worker_names_every_address_tried() -> None:
    config = {**FAST, "network": {"reconnect_attempts": 2, "reconnect_initial_delay": 0.01}}
    with pytest.raises(NetworkError, match=r"no worker reachable; tried mem://a \(.*\); mem://b"):
        async with AsyncButterfly.connect(
            ["mem://a", "mem://b"], transport=MemoryNetwork(), config=config
        ):
            pass


async def test_closing_drains_a_request_in_flight() -> None:
    net = MemoryNetwork()
    results: list[torch.Tensor] = []
    async with trio.open_nursery() as nursery:
        workers = await start_workers(nursery, net, "tests.models:slow_mlp", n=2)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:

            async def request() -> None:
                results.append(await b.infer(torch.zeros(1, 64)))

            nursery.start_soon(request)
            # In flight: past stage 0, in stage 1's 1.5 s pause when the client closes.
            await wait_until(lambda: workers[0].computed == 1, what="stage 0 computed")
        assert len(results) == 1
        nursery.cancel_scope.cancel()


async def test_bad_timeout_and_bad_peers_are_api_errors() -> None:
    with pytest.raises(ApiError, match="peers is empty"):
        async with AsyncButterfly.connect([], transport=MemoryNetwork()):
            pass
    with pytest.raises(ApiError, match="expected ws://HOST:PORT"):
        async with AsyncButterfly.connect(["http://x"]):
            pass
    with pytest.raises(
        ApiError, match="timeout must be a positive number of seconds or None, got -1"
    ):
        async with AsyncButterfly.connect(["ws://h:1"], timeout=-1):
            pass


async def test_a_worker_that_comes_back_is_used_again_in_a_new_placement() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        scopes = [await nursery.start(_cancellable_worker, net, i) for i in range(3)]
        await acquainted([s.service for s in scopes])
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            scopes[2].cancel()
            with trio.fail_after(10):
                while len(b.cluster().stages) != 2:
                    with contextlib.suppress(NetworkError):  # failing over is issue 4's work
                        await b.infer(torch.zeros(1, 64))
            await nursery.start(_cancellable_worker, net, 2)  # the same address, a new process
            with trio.fail_after(20):
                while len(b.cluster().stages) != 3:
                    await trio.sleep(0.2)
                    await b.infer(torch.zeros(1, 64))
            cluster = b.cluster()
            assert cluster.epoch == 3
            assert [s.layers for s in cluster.stages] == [range(0, 2), range(2, 4), range(4, 6)]
        nursery.cancel_scope.cancel()


async def test_the_coordinator_measures_its_link_to_every_worker() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=2)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            for worker in b.cluster().workers:
                assert worker.link is not None
                assert worker.link.bandwidth_bytes_per_s > 1e6
                assert 0 <= worker.link.latency_s < 1
        nursery.cancel_scope.cancel()


async def test_a_worker_that_joins_later_is_discovered_and_used() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=2)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            assert len(b.cluster().stages) == 2
            newcomer = WorkerService(
                ModelSource("butterfly.model.zoo:mlp", profile=False),
                transport=net,
                listen="mem://w9",
                peers=("mem://w1",),  # it only knows w1; the coordinator only knew w0
                config=load_config(FAST),
            )
            await nursery.start(newcomer.run)
            with trio.fail_after(10):
                while len(b.cluster().stages) != 3:
                    await trio.sleep(0.1)
                    await b.infer(torch.zeros(1, 64))
            assert "mem://w9" in {w.address for w in b.cluster().workers}
            x = torch.randn(3, 64)
            torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
        nursery.cancel_scope.cancel()


async def test_when_the_survivors_cannot_hold_the_model_requests_fail_with_partition_error() -> (
    None
):
    # mlp: three Linear layers of 16,640 bytes. A 20,000-byte budget fits one per worker,
    # so three workers hold the model and two cannot.
    net = MemoryNetwork()
    config = load_config({**FAST, "partition": {"default_strategy": "topology_aware"}})
    async with trio.open_nursery() as nursery:
        scopes = []
        services: list[WorkerService] = []
        for i in range(3):
            scope = trio.CancelScope()
            worker = WorkerService(
                ModelSource("butterfly.model.zoo:mlp"),
                transport=net,
                listen=f"mem://w{i}",
                peers=("mem://w0",) if i else (),
                config=config,
                max_memory=20_000,
            )
            nursery.start_soon(_run_in, scope, worker)
            scopes.append(scope)
            services.append(worker)
        await wait_until(lambda: all(w.address for w in services), what="the workers serve")
        await acquainted(services)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            x = torch.randn(1, 64)
            torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
            assert len({s.node_id for s in b.cluster().stages}) == 3  # one Linear each
            scopes[2].cancel()
            with (
                trio.fail_after(10),
                pytest.raises(
                    PartitionError,
                    match=r"needs 49920 bytes of weights and the 2 nodes have 40000 in total: "
                    r"9920 bytes missing",
                ),
            ):
                await b.infer(x)
        nursery.cancel_scope.cancel()


async def _run_in(scope: trio.CancelScope, worker: WorkerService) -> None:
    with scope:
        await worker.run()


async def test_workers_measure_their_links_to_each_other_and_the_plan_uses_them() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        workers = await start_workers(nursery, net, "butterfly.model.zoo:mlp")
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            cluster = b.cluster()
            ids = [w.node_id for w in workers]
            pairs = {(a, c) for a, c, _ in cluster.worker_links}
            assert pairs == {(a, c) for a in ids for c in ids if a != c}
            assert all(link.bandwidth_bytes_per_s > 0 for _, _, link in cluster.worker_links)
            assert "link " in str(cluster)
        nursery.cancel_scope.cancel()


async def test_one_worker_holds_the_heavy_first_and_last_layers_as_two_stages() -> None:
    # Only w0 can hold the 1 MB ends; w1 and w2 can hold only light layers. Without a
    # worker holding two stages, w0 would have to run all six layers (80 ms per request);
    # with them the four 20 ms layers are spread and the period is 40 ms.
    net = MemoryNetwork()
    config = load_config({**FAST, "partition": {"default_strategy": "topology_aware"}})
    budgets = [10_000_000, 100_000, 100_000]
    async with trio.open_nursery() as nursery:
        workers = []
        for i, budget in enumerate(budgets):
            worker = WorkerService(
                ModelSource("tests.models:heavy_ends"),
                transport=net,
                listen=f"mem://w{i}",
                peers=("mem://w0",) if i else (),
                config=config,
                max_memory=budget,
            )
            await nursery.start(worker.run)
            workers.append(worker)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            cluster = b.cluster()
            owners = [s.node_id for s in cluster.stages]
            assert owners[0] == owners[-1] == workers[0].node_id
            assert len(cluster.stages) >= 3 and len(set(owners)) == 3
            x = torch.randn(2, 64)
            with torch.inference_mode():
                expected = heavy_ends()(x)
            torch.testing.assert_close(await b.infer(x), expected, rtol=0, atol=0)
            assert cluster.quality is not None
            assert cluster.quality.estimated_throughput_rps > 20  # 40 ms period, not 80 ms
        nursery.cancel_scope.cancel()


async def test_an_internal_error_fails_only_its_request_and_the_client_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp")
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            scheduling = b._system.scheduling
            entry = scheduling._entry
            calls = 0

            def broken_once(batch: object) -> object:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise ValueError("boom")
                return entry(batch)  # type: ignore[arg-type]

            monkeypatch.setattr(scheduling, "_entry", broken_once)
            x = torch.randn(1, 64)
            with pytest.raises(
                SchedulingError, match=r"request 1 failed on an internal error: ValueError: boom"
            ):
                await b.infer(x)
            torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
        nursery.cancel_scope.cancel()


async def test_a_lost_worker_is_replaced_in_the_placement_without_waiting_for_a_request() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        scopes = [await nursery.start(_cancellable_worker, net, i) for i in range(3)]
        await acquainted([s.service for s in scopes])
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            lost = scopes[2].service.node_id
            scopes[2].cancel()
            with trio.fail_after(5):
                while b.cluster().epoch != 2:  # noqa: ASYNC110 - polls the public view
                    await trio.sleep(0.01)
            cluster = b.cluster()
            assert len(cluster.stages) == 2
            assert lost not in {s.node_id for s in cluster.stages}
            assert b.metrics().requests_completed == 0  # no request was needed for it
        nursery.cancel_scope.cancel()
