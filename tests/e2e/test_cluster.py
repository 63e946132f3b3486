"""End to end: real worker processes, real websockets, the public API exactly as a user calls it."""

from __future__ import annotations

import random
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trio
from safetensors.torch import save_file

from butterfly import (
    ApiError,
    Butterfly,
    FingerprintMismatch,
    LocalCluster,
    NetworkError,
    WorkerState,
)
from butterfly.model.zoo import mlp, small_transformer

pytestmark = pytest.mark.slow

UNIFORM = {"partition": {"default_strategy": "uniform"}}
FAST_FAILURE = {
    "coordination": {"heartbeat_interval": 0.2, "acceptable_heartbeat_pause": 1.0},
    **UNIFORM,
}


def local_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference: same thread count as each worker, inference mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return model(x)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return small_transformer()


@pytest.fixture
def client(transformer_cluster: LocalCluster) -> Butterfly:
    with Butterfly.connect(transformer_cluster.addresses, config=UNIFORM) as b:
        yield b


@pytest.mark.parametrize("batch", [1, 8])
def test_torch_input_gives_bitwise_the_local_forward(
    client: Butterfly, reference: torch.nn.Module, batch: int
) -> None:
    x = torch.randn(batch, 16, 256)
    y = client.infer(x)
    assert isinstance(y, torch.Tensor)
    assert y.dtype == torch.float32 and y.device == x.device
    torch.testing.assert_close(y, local_forward(reference, x), rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 8])
def test_numpy_input_gives_bitwise_the_local_forward(
    client: Butterfly, reference: torch.nn.Module, batch: int
) -> None:
    x = np.random.default_rng(batch).standard_normal((batch, 16, 256), dtype=np.float32)
    y = client.infer(x)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    np.testing.assert_array_equal(y, local_forward(reference, torch.from_numpy(x)).numpy())


def test_hundred_sequential_requests_are_all_correct(
    client: Butterfly, reference: torch.nn.Module
) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(100):
        x = torch.randn(1, 8, 256, generator=gen)
        torch.testing.assert_close(client.infer(x), local_forward(reference, x), rtol=0, atol=0)
    assert client.metrics().requests_completed == 100


def test_placement_spreads_contiguous_stages_over_the_workers(
    client: Butterfly, transformer_cluster: LocalCluster
) -> None:
    cluster = client.cluster()
    assert [s.layers for s in cluster.stages] == [range(0, 2), range(2, 4), range(4, 6)]
    assert {w.address for w in cluster.workers} == set(transformer_cluster.addresses)
    assert all(w.state is WorkerState.READY for w in cluster.workers)


def test_coordinator_discovers_the_cluster_from_one_worker(
    transformer_cluster: LocalCluster,
) -> None:
    with Butterfly.connect([transformer_cluster.addresses[-1]], config=UNIFORM) as b:
        assert {w.address for w in b.cluster().workers} == set(transformer_cluster.addresses)
        assert len(b.cluster().stages) == 3


def test_facade_works_from_a_plain_thread(client: Butterfly, reference: torch.nn.Module) -> None:
    x = torch.randn(2, 8, 256)
    out: list[torch.Tensor] = []
    thread = threading.Thread(target=lambda: out.append(client.infer(x)))
    thread.start()
    thread.join(60)
    torch.testing.assert_close(out[0], local_forward(reference, x), rtol=0, atol=0)


def test_facade_serves_two_threads_at_once(client: Butterfly, reference: torch.nn.Module) -> None:
    inputs = {
        i: torch.randn(1, 8, 256, generator=torch.Generator().manual_seed(i)) for i in range(2)
    }
    outputs: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(i: int) -> None:
        for _ in range(10):
            outputs[i].append(client.infer(inputs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(2):
        assert len(outputs[i]) == 10
        for y in outputs[i]:
            torch.testing.assert_close(y, local_forward(reference, inputs[i]), rtol=0, atol=0)


def test_wrong_shape_and_dtype_are_api_errors_and_the_next_request_works(
    client: Butterfly, reference: torch.nn.Module
) -> None:
    with pytest.raises(
        ApiError,
        match=r"input has shape \(1, 8, 100\) and dtype float32; the model expects shape \(\*, \*, 256\)",
    ):
        client.infer(torch.zeros(1, 8, 100))
    with pytest.raises(ApiError, match=r"dtype float64; the model expects .* dtype float32"):
        client.infer(np.zeros((1, 8, 256)))
    with pytest.raises(
        ApiError, match=r"must be a numpy.ndarray or torch.Tensor, got builtins.list"
    ):
        client.infer([[1.0]])
    x = torch.randn(1, 8, 256)
    torch.testing.assert_close(client.infer(x), local_forward(reference, x), rtol=0, atol=0)


def test_sync_facade_is_refused_inside_a_trio_run(client: Butterfly) -> None:
    async def misuse() -> None:
        client.infer(torch.zeros(1, 8, 256))

    with pytest.raises(ApiError, match=r"use `async with AsyncButterfly.connect"):
        trio.run(misuse)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_reachable_peer_is_a_network_error_naming_the_addresses() -> None:
    dead = [f"ws://127.0.0.1:{_free_port()}", f"ws://127.0.0.1:{_free_port()}"]
    config = {"network": {"reconnect_attempts": 2, "reconnect_initial_delay": 0.05}}
    with pytest.raises(NetworkError, match=f"no worker reachable; tried {dead[0]} .*{dead[1]}"):
        Butterfly.connect(dead, config=config)


def test_a_request_survives_its_worker_being_killed_mid_request() -> None:
    with (
        LocalCluster("tests.models:slow_mlp", workers=3, threads=1) as cluster,
        Butterfly.connect(cluster.addresses, config=FAST_FAILURE) as b,
    ):
        middle = b.cluster().stages[1].address
        victim = next(p for p in cluster.processes if p.address == middle)
        threading.Timer(0.5, victim.kill).start()  # while the request sleeps in that stage
        from tests.models import slow_mlp

        x = torch.randn(2, 64)
        torch.testing.assert_close(
            b.infer(x, timeout=30), local_forward(slow_mlp(), x), rtol=0, atol=0
        )
        assert len(b.cluster().stages) == 2


def test_a_restarted_worker_rejoins_on_its_address() -> None:
    with (
        LocalCluster("butterfly.model.zoo:mlp", workers=3) as cluster,
        Butterfly.connect(cluster.addresses, config=FAST_FAILURE) as b,
    ):
        old = cluster.processes[1]
        new = cluster.restart(old)
        assert new.address == old.address and new.node_id != old.node_id
        deadline = time.monotonic() + 30
        while new.node_id not in {s.node_id for s in b.cluster().stages}:
            assert time.monotonic() < deadline, "the restarted worker was not used again"
            b.infer(torch.randn(1, 64))
            time.sleep(0.2)
        x = torch.randn(2, 64)
        assert torch.equal(b.infer(x), local_forward(mlp(), x))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_hundred_requests_complete_bitwise_when_a_random_worker_is_killed(seed: int) -> None:
    rng = random.Random(seed)
    inputs = [torch.randn(1, 64, generator=torch.Generator().manual_seed(i)) for i in range(100)]
    expected = [local_forward(mlp(), x) for x in inputs]
    config = {**FAST_FAILURE, "scheduling": {"max_in_flight": 8}}
    with (
        LocalCluster("butterfly.model.zoo:mlp", workers=3, threads=1) as cluster,
        Butterfly.connect(cluster.addresses, config=config) as b,
    ):
        victim = rng.choice(cluster.processes)
        kill_after = rng.randrange(5, 60)
        handles = []
        for i, x in enumerate(inputs):
            handles.append(b.submit(x, timeout=60))
            if i == kill_after:
                victim.kill()
        outputs = [h.result(timeout=120) for h in handles]
        metrics = b.metrics()
    assert all(torch.equal(y, e) for y, e in zip(outputs, expected, strict=True))
    assert metrics.requests_completed == 100
    assert metrics.requests_failed == {}


def test_workers_with_different_weights_are_refused_at_connect(tmp_path: Path) -> None:
    # An unseeded factory: each process draws its own weights.
    with (
        LocalCluster("tests.models:random_mlp", workers=2) as cluster,
        pytest.raises(FingerprintMismatch, match=r"different weights.*must be deterministic"),
    ):
        Butterfly.connect(cluster.addresses)


def test_weights_file_is_loaded_by_every_worker(tmp_path: Path) -> None:
    trained = mlp()
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(-2.0)
    path = tmp_path / "mlp.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    with Butterfly.local("butterfly.model.zoo:mlp", workers=2, weights=path) as b:
        x = torch.randn(4, 64)
        torch.testing.assert_close(b.infer(x), local_forward(trained, x), rtol=0, atol=0)


def test_local_cluster_shuts_down_cleanly_leaving_no_process_or_thread() -> None:
    threads_before = set(threading.enumerate())
    with Butterfly.local("butterfly.model.zoo:mlp", workers=2) as b:
        b.infer(torch.zeros(1, 64))
        processes = list(b.local_cluster.processes)  # type: ignore[union-attr]
    assert [p.proc.returncode for p in processes] == [0, 0]
    time.sleep(0.2)
    leftover = [
        t for t in set(threading.enumerate()) - threads_before if t.is_alive() and not t.daemon
    ]
    assert leftover == []
    assert not any(t.name == "butterfly-trio" and t.is_alive() for t in threading.enumerate())


def test_local_cluster_stops_its_workers_when_the_body_raises() -> None:
    with (
        pytest.raises(RuntimeError, match="user bug"),
        Butterfly.local("butterfly.model.zoo:mlp", workers=2) as b,
    ):
        processes = list(b.local_cluster.processes)  # type: ignore[union-attr]
        raise RuntimeError("user bug")
    assert all(not p.alive() for p in processes)


def test_local_refuses_a_model_worker_processes_cannot_import() -> None:
    with pytest.raises(ApiError, match="not importable by worker processes"):
        Butterfly.local(lambda: mlp(), workers=1)


def test_ctrl_c_while_waiting_cancels_the_request_and_the_client_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.models import GATED, gated_mlp

    # Ctrl-C is Python's default SIGINT handler, which a process does not get when it
    # starts with SIGINT ignored — as every background job of a non-interactive shell does
    # (the stress runs, some CI runners). Install it, as an interactive session has it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    gate = tmp_path / "gate"  # the request waits at stage 0 until this file exists
    monkeypatch.setenv("BUTTERFLY_TEST_GATE", str(gate))
    try:
        with Butterfly.local("tests.models:gated_mlp", workers=2) as b:
            main = threading.main_thread().ident
            assert main == threading.get_ident()
            timer = threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGINT))
            timer.start()
            held = torch.zeros(1, 64)
            held[0, 0] = GATED
            try:
                # The request cannot finish before the gate opens: only Ctrl-C ends this wait.
                with pytest.raises(KeyboardInterrupt):
                    b.infer(held, timeout=20)
            finally:
                timer.join()
                gate.touch()
            x = torch.randn(1, 64)
            torch.testing.assert_close(b.infer(x), local_forward(gated_mlp(), x), rtol=0, atol=0)
            assert (b.metrics().requests_cancelled, b.metrics().requests_failed) == (1, {})
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_stopped_worker_is_suspected_then_rejoins_when_it_resumes() -> None:
    with (
        LocalCluster("butterfly.model.zoo:mlp", workers=3) as cluster,
        Butterfly.connect(cluster.addresses, config=FAST_FAILURE) as b,
    ):
        victim = cluster.processes[2]
        states = lambda: {w.address: w.state for w in b.cluster().workers}  # noqa: E731
        victim.suspend()
        stopped = time.monotonic()
        try:
            while states()[victim.address] is WorkerState.READY:
                assert time.monotonic() - stopped < 8, "not suspected within 8 s"
                time.sleep(0.1)
            x = torch.randn(1, 64)
            # Requests keep being served by the two others.
            assert torch.equal(b.infer(x), local_forward(mlp(), x))
            assert len(b.cluster().stages) == 2
        finally:
            victim.resume()
        deadline = time.monotonic() + 30
        while states()[victim.address] is not WorkerState.READY or len(b.cluster().stages) != 3:
            assert time.monotonic() < deadline, "did not rejoin within 30 s"
            b.infer(torch.randn(1, 64))
            time.sleep(0.2)


def test_requests_sent_while_a_worker_is_stopped_for_10_s_are_each_answered_once() -> None:
    # Default liveness settings (1 s heartbeats, 3 s acceptable pause): the stopped worker
    # holds requests until it is suspected; they are re-run on the survivors. When it
    # resumes it finishes its backlog, and those late answers of the old epoch are dropped.
    inputs = [torch.randn(1, 64, generator=torch.Generator().manual_seed(i)) for i in range(50)]
    with (
        LocalCluster("butterfly.model.zoo:mlp", workers=3) as cluster,
        Butterfly.connect(cluster.addresses, config=UNIFORM) as b,
    ):
        victim = next(p for p in cluster.processes if p.address == b.cluster().stages[1].address)
        victim.suspend()
        try:
            handles = []
            for x in inputs:
                handles.append(b.submit(x, timeout=60))
                time.sleep(0.2)
        finally:
            victim.resume()
        outputs = [h.result(timeout=60) for h in handles]
        metrics = b.metrics()
    assert all(
        torch.equal(y, local_forward(mlp(), x)) for y, x in zip(outputs, inputs, strict=True)
    )
    assert metrics.requests_completed == 50
    assert metrics.requests_failed == {}
    assert metrics.requests_retried["network"] >= 1
