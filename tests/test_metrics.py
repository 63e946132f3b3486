"""Metrics through the public API: one request's events from every component, the
Prometheus exposition after a known number of requests, dropped events, traces
(in-memory transport, real worker services)."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from butterfly import AsyncButterfly
from butterfly.config import load_config
from butterfly.errors import ApiError, ConfigError
from butterfly.metrics import events
from butterfly.transport import MemoryNetwork
from tests.exposition import samples
from tests.inmemory import FAST, local_forward, start_workers
from tests.waiting import wait_until

ACTIVATION_BYTES = 2 * 64 * 4  # a (2, 64) float32 input; every mlp stage keeps that shape


async def test_one_request_is_traced_through_the_queue_every_stage_and_every_hop() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        workers = await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=2)
        w0, w1 = (w.node_id for w in workers)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            me = b._system.coordination.node_id
            x = torch.randn(2, 64)
            handle = await b.submit(x)
            torch.testing.assert_close(await handle.result(), local_forward(x), rtol=0, atol=0)
            trace = b.trace(handle.task_id)
        nursery.cancel_scope.cancel()
    assert [type(e).__name__ for e in trace] == [
        "TaskSubmitted",
        "TaskEnqueued",
        "TaskDispatching",
        "TaskDispatched",
        "LinkTransferred",
        "StageComputed",
        "LinkTransferred",
        "StageComputed",
        "LinkTransferred",
        "TaskCompleted",
    ]
    links = [(e.src, e.dst, e.nbytes) for e in trace if isinstance(e, events.LinkTransferred)]
    assert links == [
        (me, w0, ACTIVATION_BYTES),
        (w0, w1, ACTIVATION_BYTES),
        (w1, me, ACTIVATION_BYTES),
    ]
    stages = [(e.stage, e.node, e.out_bytes) for e in trace if isinstance(e, events.StageComputed)]
    assert stages == [(0, w0, ACTIVATION_BYTES), (1, w1, ACTIVATION_BYTES)]
    assert all(
        e.compute_s > 0 and e.wait_s >= 0 for e in trace if isinstance(e, events.StageComputed)
    )
    done = trace[-1]
    assert isinstance(done, events.TaskCompleted)
    assert done.nodes == tuple(sorted((w0, w1))) and done.rows == 2 and done.latency_s > 0


async def test_every_component_reports_into_the_snapshot_and_the_exposition() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        workers = await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=2)
        w0, w1 = (w.node_id for w in workers)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            me = b._system.coordination.node_id
            for _ in range(5):
                x = torch.randn(2, 64)
                torch.testing.assert_close(await b.infer(x), local_forward(x), rtol=0, atol=0)
            snapshot = b.metrics()
            series = samples(b.metrics_text())
        nursery.cancel_scope.cancel()
    # scheduling and api
    assert snapshot.requests_completed == 5 and snapshot.requests_failed == {}
    assert (snapshot.queue_depth, snapshot.requests_in_flight) == (0, 0)
    assert series[("butterfly_requests_total", (("status", "completed"),))] == 5
    assert series[("butterfly_request_duration_seconds_count", ())] == 5
    assert series[("butterfly_queue_depth", ())] == 0
    assert series[("butterfly_requests_in_flight", ())] == 0
    # the stages and links, from the workers' timings
    assert set(snapshot.stage_compute_s) == {(0, w0), (1, w1)}
    assert series[("butterfly_stage_compute_seconds_count", (("node", w0), ("stage", "0")))] == 5
    assert snapshot.link_bytes == {
        (me, w0): 5 * ACTIVATION_BYTES,
        (w0, w1): 5 * ACTIVATION_BYTES,
        (w1, me): 5 * ACTIVATION_BYTES,
    }
    assert (
        series[("butterfly_link_bytes_total", (("dst", w1), ("src", w0)))] == 5 * ACTIVATION_BYTES
    )
    assert series[("butterfly_link_transfer_seconds_count", (("dst", w1), ("src", w0)))] == 5
    # partition and coordination
    assert (snapshot.plan_cache_misses, snapshot.placements, snapshot.consensus_reached) == (
        1,
        1,
        1,
    )
    assert series[("butterfly_partition_cache_misses_total", ())] == 1
    assert series[("butterfly_consensus_reached_total", ())] == 1
    assert snapshot.worker_states == {w0: "ready", w1: "ready"}
    assert (
        series[
            ("butterfly_phase_transitions_total", (("phase", "commitment"), ("scope", "request")))
        ]
        == 5
    )
    # network: 5 activations out to the first stage, 5 results in
    assert series[("butterfly_messages_total", (("direction", "out"), ("kind", "Activation")))] == 5
    assert series[("butterfly_messages_total", (("direction", "in"), ("kind", "Result")))] == 5
    assert (
        series[("butterfly_tensor_bytes_total", (("direction", "in"), ("peer", w1)))]
        == 5 * ACTIVATION_BYTES
    )
    assert snapshot.events_dropped == 0
    assert series[("butterfly_events_dropped_total", ())] == 0


async def test_a_full_event_channel_drops_and_counts_events_and_requests_go_on() -> None:
    config: dict[str, Any] = {**FAST, "metrics": {"event_queue_size": 1}}
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=2)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            xs = [torch.randn(1, 64) for _ in range(8)]
            outputs = await b.infer_many(xs)  # eight submissions in one go: a burst of events
            for x, out in zip(xs, outputs, strict=True):
                torch.testing.assert_close(out, local_forward(x), rtol=0, atol=0)
            snapshot = b.metrics()
            series = samples(b.metrics_text())
        nursery.cancel_scope.cancel()
    assert snapshot.events_dropped > 0
    assert series[("butterfly_events_dropped_total", ())] == snapshot.events_dropped


async def test_a_trace_asks_for_a_task_id_and_an_unknown_task_has_none() -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=1)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            with pytest.raises(ApiError, match=r"task_id must be a positive int .*, got 'one'"):
                b.trace("one")  # type: ignore[arg-type]
            assert b.trace(12345) == []
        nursery.cancel_scope.cancel()


async def test_generation_counts_its_tokens_and_times_the_first_and_the_next(
    saved: Any,
) -> None:
    from tests.test_generation import Cluster, prompt

    directory: Path = saved("gpt2")
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, directory)
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=FAST) as b:
            await b.generate(prompt(batch=2), max_new_tokens=6)
            snapshot = b.metrics()
            series = samples(b.metrics_text())
        nursery.cancel_scope.cancel()
    assert snapshot.tokens_generated == 12
    assert series[("butterfly_tokens_generated_total", ())] == 12
    assert series[("butterfly_time_to_first_token_seconds_count", ())] == 1
    assert series[("butterfly_time_per_output_token_seconds_count", ())] == 5
    assert snapshot.time_to_first_token_p50_s is not None


async def test_one_inference_emits_this_sequence_of_events_from_every_component(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=2)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=FAST) as b:
            metrics = b._system.metrics
            seen: list[events.Event] = []
            apply = metrics._apply

            def record(event: events.Event) -> None:
                seen.append(event)
                apply(event)

            b.metrics()  # what connecting emitted is applied: from here on, one inference
            monkeypatch.setattr(metrics, "_apply", record)
            await b.infer(torch.randn(2, 64))
            b.metrics()
        nursery.cancel_scope.cancel()
    background = (events.CacheReported, events.WorkerStateChanged)  # heartbeats' answers
    names = [
        type(e).__name__ + (f":{e.phase}" if isinstance(e, events.PhaseTransition) else "")
        for e in seen
        if not isinstance(e, background)
    ]
    assert names == [
        "TaskSubmitted",
        "TaskEnqueued",
        "TaskDispatching",
        "PhaseTransition:assignment",
        "MessageSent",
        "BytesTransferred",
        "PhaseTransition:computation",
        "TaskDispatched",
        "MessageReceived",
        "BytesTransferred",
        "LinkTransferred",
        "StageComputed",
        "LinkTransferred",
        "StageComputed",
        "LinkTransferred",
        "PhaseTransition:aggregation",
        "TaskCompleted",
        "PhaseTransition:commitment",
    ]


async def test_a_summary_goes_to_the_log_every_export_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="butterfly.metrics")
    config: dict[str, Any] = {**FAST, "metrics": {"export_interval_secs": 0.1}}
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=1)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            await b.infer(torch.randn(1, 64))

            def summaries() -> list[str]:
                messages = [r.getMessage() for r in caplog.records]
                return [m for m in messages if m.startswith("metrics: 1 completed")]

            await wait_until(lambda: len(summaries()) >= 2, what="two summaries after it")
        nursery.cancel_scope.cancel()
    assert summaries()[-1].startswith("metrics: 1 completed, 0 failed, 0 queued, 0 in flight, p50 ")


async def test_the_client_serves_its_metrics_and_health_over_http_with_metrics_listen() -> None:
    config: dict[str, Any] = {**FAST, "metrics": {"listen": "127.0.0.1:0"}}
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=1)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            await b.infer(torch.randn(1, 64))
            address = b._system.metrics_address
            assert address is not None
            base = f"http://{address[0]}:{address[1]}"

            def get(path: str) -> tuple[int, str]:
                with urllib.request.urlopen(base + path, timeout=5) as response:
                    return response.status, response.read().decode()

            status, text = await trio.to_thread.run_sync(get, "/metrics")
            health = await trio.to_thread.run_sync(get, "/health")
        nursery.cancel_scope.cancel()
    assert status == 200
    assert samples(text)[("butterfly_requests_total", (("status", "completed"),))] == 1
    assert health == (200, '{"status": "ok", "stages": 1}\n')


def test_metrics_listen_must_be_host_and_port() -> None:
    with pytest.raises(
        ConfigError,
        match=r"metrics\.listen: must be HOST:PORT \(e\.g\. 127\.0\.0\.1:9200\), got 'nope'",
    ):
        load_config({"metrics": {"listen": "nope"}})


async def test_a_micro_batch_counts_its_bytes_once_and_is_in_each_of_its_tasks_traces() -> None:
    config: dict[str, Any] = {
        **FAST,
        "scheduling": {"dispatch_batch_size": 16, "max_batch_wait_ms": 200},
    }
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery:
        (worker,) = await start_workers(nursery, net, "butterfly.model.zoo:mlp", n=1)
        async with AsyncButterfly.connect(["mem://w0"], transport=net, config=config) as b:
            me = b._system.coordination.node_id
            first, second = await b.submit(torch.randn(1, 64)), await b.submit(torch.randn(2, 64))
            await first.result()
            await second.result()
            assert worker.computed == 1  # one request for both
            snapshot = b.metrics()
            traces = [b.trace(first.task_id), b.trace(second.task_id)]
        nursery.cancel_scope.cancel()
    rows_bytes = 3 * 64 * 4
    assert snapshot.link_bytes == {
        (me, worker.node_id): rows_bytes,
        (worker.node_id, me): rows_bytes,
    }
    for trace in traces:
        assert [type(e).__name__ for e in trace if isinstance(e, events.StageComputed)] == [
            "StageComputed"
        ]
