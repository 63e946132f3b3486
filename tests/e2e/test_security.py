"""Authentication between real processes: strangers are refused before any model code runs."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import trio
import trio_websocket

from butterfly import AuthenticationError, Butterfly, LocalCluster, NetworkError
from butterfly.config import NetworkConfig
from butterfly.model.zoo import mlp
from butterfly.protocol import (
    PROTOCOL_VERSION,
    Activation,
    Assign,
    Assigned,
    Handshake,
    Heartbeat,
    Hello,
    StageSpec,
    encode,
)
from butterfly.protocol.codec import array_to_wire
from butterfly.transport import WebsocketTransport, open_peer
from butterfly.transport.rfc6455 import Opcode, encode_header
from tests.models import counting_mlp
from tests.tolerance import torch_threads

pytestmark = pytest.mark.slow

SECRET = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"
FAST_HANDSHAKE = {"network": {"connect_timeout": 1.0}}


class Calls:
    """How often model code ran in the workers (see ``tests.models.CountCalls``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, Calls]]:
    """Two workers with the secret, serving a model that counts its calls."""
    directory = tmp_path_factory.mktemp("secured")
    calls = directory / "calls"
    config = directory / "butterfly.toml"
    config.write_text("[network]\nconnect_timeout = 1.0\n")
    with LocalCluster(
        "tests.models:counting_mlp",
        workers=2,
        secret=SECRET,
        config=config,
        worker_env=[{"BUTTERFLY_TEST_CALLS": str(calls)}] * 2,
    ) as cluster:
        yield cluster, Calls(calls)


def _local(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference, with one thread as each worker (and the caller's count restored: a
    later test in this process compares its worker threads with its own forward bitwise)."""
    with torch_threads(1), torch.inference_mode():
        return model(x)


def test_a_client_with_the_secret_is_served(secured: tuple[LocalCluster, Calls]) -> None:
    cluster, _ = secured
    x = torch.randn(2, 64)
    with Butterfly.connect(cluster.addresses, secret=SECRET) as b:
        assert torch.equal(b.infer(x), _local(counting_mlp(), x))


def test_a_client_without_the_secret_is_refused_before_any_model_code_runs(
    secured: tuple[LocalCluster, Calls],
) -> None:
    cluster, calls = secured
    before = calls()
    started = time.monotonic()
    with pytest.raises(
        AuthenticationError,
        match=f"{cluster.addresses[0]} authenticates with a shared secret and this side has none",
    ):
        Butterfly.connect(cluster.addresses[:1], config=FAST_HANDSHAKE, timeout=10)
    assert time.monotonic() - started < 5
    assert calls() == before


def test_a_client_with_a_wrong_secret_is_refused_before_any_model_code_runs(
    secured: tuple[LocalCluster, Calls],
) -> None:
    cluster, calls = secured
    before = calls()
    with pytest.raises(AuthenticationError, match="did not prove the shared secret"):
        Butterfly.connect(
            cluster.addresses, secret="not the cluster's secret!", config=FAST_HANDSHAKE
        )
    assert calls() == before


def test_the_secret_can_come_from_the_file_named_in_the_config(
    secured: tuple[LocalCluster, Calls], tmp_path: Path
) -> None:
    cluster, _ = secured
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    x = torch.randn(1, 64)
    config = {"network": {"secret_file": str(secret_file)}}
    with Butterfly.connect(cluster.addresses, config=config) as b:
        assert torch.equal(b.infer(x), _local(counting_mlp(), x))


def test_the_secret_can_come_from_the_environment(
    secured: tuple[LocalCluster, Calls], monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster, _ = secured
    monkeypatch.setenv("BUTTERFLY_SECRET", SECRET)
    x = torch.randn(1, 64)
    with Butterfly.connect(cluster.addresses) as b:
        assert torch.equal(b.infer(x), _local(counting_mlp(), x))


def _raw_activation() -> bytes:
    x = torch.randn(1, 64).numpy()
    return encode(
        Activation(
            request_id=1,
            epoch=0,
            stage=0,
            origin="intruder",
            layer=0,
            compute_s=0.0,
            session=0,
            position=0,
            keep=(),
            trace=(),
            report=False,
            tensor=array_to_wire(x),
        )
    )


async def _send_unauthenticated(address: str, frames: list[bytes]) -> bool:
    """Open a websocket, send ``frames`` without authenticating; True if the worker closed it."""
    async with trio_websocket.open_websocket_url(address) as ws:
        with trio.move_on_after(5):
            try:
                for frame in frames:
                    await ws.send_message(frame)
                while True:
                    await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return True
    return False


def test_an_activation_sent_without_authenticating_closes_the_connection_and_runs_nothing(
    secured: tuple[LocalCluster, Calls],
) -> None:
    cluster, calls = secured
    before = calls()
    assert trio.run(_send_unauthenticated, cluster.addresses[0], [_raw_activation()] * 3)
    assert calls() == before


def test_a_connection_that_stalls_in_the_handshake_is_closed_within_its_timeout(
    secured: tuple[LocalCluster, Calls],
) -> None:
    cluster, _ = secured
    started = time.monotonic()
    assert trio.run(_send_unauthenticated, cluster.addresses[0], [])
    assert time.monotonic() - started < 4  # network.connect_timeout is 1 s on these workers


def test_butterfly_local_gives_its_workers_a_secret_of_their_own() -> None:
    with Butterfly.local("butterfly.model.zoo:mlp", workers=1) as b:
        assert b.local_cluster is not None
        with pytest.raises(AuthenticationError, match="this side has none"):
            Butterfly.connect(b.local_cluster.addresses, config=FAST_HANDSHAKE)
        x = torch.randn(1, 64)
        assert torch.equal(b.infer(x), _local(mlp(), x))


class BitFlipper:
    """A TCP proxy to a worker that, once armed, flips one bit in the first chunk that ends
    beyond 4 KiB of traffic since arming: inside the one large frame of the test, however
    the kernel splits it (the few small frames in between are heartbeats)."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("ws://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"ws://127.0.0.1:{self.listener.getsockname()[1]}"
        self.armed = threading.Event()
        self._lock = threading.Lock()
        self._since_armed = 0
        self.flipped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(1 << 16):
                sink.sendall(self._maybe_flip(chunk))
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def _maybe_flip(self, chunk: bytes) -> bytes:
        with self._lock:
            if not self.armed.is_set():
                return chunk
            self._since_armed += len(chunk)
            if self._since_armed <= 4096:
                return chunk
            self.armed.clear()
            self.flipped.set()
        flipped = bytearray(chunk)
        flipped[len(flipped) // 2] ^= 0x10
        return bytes(flipped)

    def close(self) -> None:
        self.listener.close()


def test_a_flipped_bit_closes_the_link_and_the_request_is_rerun_to_the_right_answer() -> None:
    uniform = {"partition": {"default_strategy": "uniform"}}  # both workers hold a stage
    with LocalCluster("butterfly.model.zoo:mlp", workers=2, secret=SECRET) as cluster:
        proxy = BitFlipper(cluster.addresses[0])
        try:
            # Only the proxy is a seed: the coordinator learns the other worker from the
            # first one's Hello, and the first one's own address (from its Acks) only once
            # its session through the proxy holds that worker id, so it keeps the proxy.
            seeds = [proxy.address]
            with Butterfly.connect(seeds, secret=SECRET, config=uniform) as b:
                # 16 KiB: the request's input or its result (whichever crosses the proxy)
                # is the only large frame on the proxied link.
                x = torch.randn(64, 64)
                proxy.armed.set()
                y = b.infer(x)
                assert proxy.flipped.is_set()
                assert torch.equal(y, _local(mlp(), x))
                assert sum(b.metrics().requests_retried.values()) == 1
        finally:
            proxy.close()


def test_a_worker_refuses_to_listen_beyond_loopback_without_a_secret() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "butterfly.worker",
            "--listen",
            "0.0.0.0:0",
            "--model",
            "butterfly.model.zoo:mlp",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "accepts connections from other machines, and no shared secret is set" in result.stderr
    assert "--insecure" in result.stderr


def test_a_worker_refuses_a_secret_shorter_than_16_bytes(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("short\n")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "butterfly.worker",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "butterfly.model.zoo:mlp",
            "--secret-file",
            str(secret),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "has 5 bytes; a shared secret needs at least 16" in result.stderr


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def test_a_thousand_idle_connections_from_one_address_are_capped_and_timed_out_while_a_client_is_served(
    secured: tuple[LocalCluster, Calls],
) -> None:
    cluster, _ = secured
    port = _port(cluster.addresses[0])
    idle = []
    try:
        for _ in range(1000):
            s = socket.socket()
            s.bind(("127.0.0.5", 0))  # another loopback address than the client's
            s.connect(("127.0.0.1", port))
            idle.append(s)
        x = torch.randn(1, 64)
        with Butterfly.connect(cluster.addresses, secret=SECRET) as b:
            assert torch.equal(b.infer(x), _local(counting_mlp(), x))
        # network.max_connections_per_address (32) were held, and dropped after the 1 s
        # handshake timeout; the rest were closed at once. All read end-of-stream now.
        for s in idle:
            s.settimeout(5)
            assert s.recv(1) == b""
        refused = (
            Path(cluster.processes[0].log.name).read_text().count("max_connections_per_address 32")
        )
        assert refused >= 500  # most were closed at once, not after a timeout
    finally:
        for s in idle:
            s.close()


def test_a_large_frame_before_authentication_is_refused_without_being_read(
    secured: tuple[LocalCluster, Calls],
) -> None:
    cluster, _ = secured

    async def send_large() -> int:
        async with trio_websocket.open_websocket_url(
            cluster.addresses[0], max_message_size=1 << 30
        ) as ws:
            with trio.fail_after(5):
                try:
                    await ws.send_message(b"\x00" * (1 << 20))
                    while True:
                        await ws.get_message()  # the worker's offer, then its close
                except trio_websocket.ConnectionClosed as closed:
                    return closed.reason.code
        return 0

    assert trio.run(send_large) == 1009  # message too big


async def _never_reads_its_results(address: str, node_id: str, stop: threading.Event) -> None:
    """A coordinator (it has the secret) that places the model, floods the worker with 4 MiB
    requests and heartbeats, and never reads another byte."""
    transport = WebsocketTransport(NetworkConfig())
    async with (
        transport.connect(address) as conn,
        open_peer(
            conn, max_message_size=1 << 28, send_queue_size=16, secret=SECRET.encode(), dialer=True
        ) as peer,
    ):
        me = Hello(
            version=PROTOCOL_VERSION, node_id="hog", role="coordinator", heartbeat_interval=1.0
        )
        await peer.handshake(me, Handshake(me, expect_roles=frozenset({"worker"})), timeout=5)
        stage = StageSpec(index=0, start=0, stop=6, node_id=node_id, address=address)
        await peer.send(Assign(epoch=1, stages=(stage,)))
        while not isinstance(await peer.receive(), Assigned):
            pass
        big = array_to_wire(np.zeros((16384, 64), dtype=np.float32))
        with contextlib.suppress(NetworkError):  # until the worker drops us
            for i in range(200):
                await peer.send(Heartbeat(seq=i))
                await peer.send(
                    Activation(
                        request_id=i, epoch=1, stage=0, origin="hog", layer=0, compute_s=0.0,
                        session=0, position=0, keep=(), trace=(), report=False, tensor=big,
                    )
                )  # fmt: skip
            await trio.to_thread.run_sync(stop.wait, abandon_on_cancel=True)


def test_a_client_that_never_reads_its_results_is_dropped_and_the_others_keep_being_served() -> (
    None
):
    with LocalCluster("butterfly.model.zoo:mlp", workers=1, secret=SECRET) as cluster:
        address, node_id = cluster.addresses[0], cluster.processes[0].node_id
        x = torch.randn(1, 64)
        with Butterfly.connect(cluster.addresses, secret=SECRET) as b:
            stop = threading.Event()
            hog = threading.Thread(
                target=lambda: trio.run(_never_reads_its_results, address, node_id, stop),
                daemon=True,
            )
            hog.start()
            try:
                time.sleep(2)  # the hog's results fill its queue
                for _ in range(10):
                    started = time.monotonic()
                    assert torch.equal(b.infer(x, timeout=10), _local(mlp(), x))
                    assert time.monotonic() - started < 2
            finally:
                stop.set()
                hog.join(10)
        log_text = Path(cluster.processes[0].log.name).read_text()
        assert "coordinator hog does not read its results" in log_text


async def _hold_partial_frames(address: str, declared: int, sent: int, n: int) -> list[str]:
    """``n`` authenticated coordinator connections, each sending the start of a frame that
    declares ``declared`` bytes and stalling after ``sent`` of them; what each one then hears."""
    transport = WebsocketTransport(NetworkConfig())
    heard: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        for i in range(n):
            conn = await stack.enter_async_context(transport.connect(address))
            peer = await stack.enter_async_context(
                open_peer(
                    conn, max_message_size=1 << 20, send_queue_size=4, secret=SECRET.encode(),
                    dialer=True,
                )
            )  # fmt: skip
            # A slow heartbeat pace: the worker must not drop the first connections (they
            # send none) before the last one has been tried, however loaded the machine.
            me = Hello(
                version=PROTOCOL_VERSION, node_id=f"hold-{i}", role="coordinator",
                heartbeat_interval=30.0,
            )  # fmt: skip
            await peer.handshake(me, Handshake(me, expect_roles=frozenset({"worker"})), timeout=5)
            header = encode_header(Opcode.BINARY, declared, mask_key=b"\x01\x02\x03\x04")
            await conn._stream.send_all(header + bytes(sent))  # type: ignore[attr-defined]
            try:
                with trio.move_on_after(1):
                    await peer.receive()
                heard.append("nothing")
            except NetworkError as exc:
                heard.append(str(exc))
    return heard


def test_partly_sent_frames_are_capped_across_connections_and_a_client_is_still_served(
    tmp_path: Path,
) -> None:
    # Frames may be 8 MiB, and 16 MiB of them may be in the works at once: two 7 MiB
    # frames stalled after 6 MiB fit; a third is refused when its header arrives.
    config = tmp_path / "butterfly.toml"
    config.write_text("[network]\nmax_message_size = 8388608\nmax_buffered_bytes = 16777216\n")
    with LocalCluster(
        "butterfly.model.zoo:mlp", workers=1, secret=SECRET, config=config
    ) as cluster:
        heard = trio.run(_hold_partial_frames, cluster.addresses[0], 7 << 20, 6 << 20, 3)
        assert heard[:2] == ["nothing", "nothing"]
        assert heard[2] == (
            f"connection to {cluster.addresses[0]} closed: peer closed with code 1013 "
            "(7340032-byte frame refused: 14680064 of 16777216 bytes (network.max_buffered_bytes) held)"
        )
        x = torch.randn(1, 64)  # the stalled frames' connections are gone: a client is served
        with Butterfly.connect(cluster.addresses, secret=SECRET) as b:
            assert torch.equal(b.infer(x), _local(mlp(), x))
