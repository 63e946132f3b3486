"""A worker's /metrics and /health over HTTP (``--metrics-listen``), real processes."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from butterfly import Butterfly
from butterfly.model.zoo import mlp
from tests.exposition import samples

pytestmark = pytest.mark.slow

SECRET = "metrics-test-secret-0123456789abcdef"
MLP_WEIGHT_BYTES = 3 * (64 * 64 + 64) * 4  # three Linear(64, 64), float32


class Worker:
    """``python -m butterfly.worker`` with ``--metrics-listen``, its stdout lines in a queue."""

    def __init__(self, tmp_path: Path, load_s: float = 0.0) -> None:
        secret_file = tmp_path / "secret"
        secret_file.write_text(SECRET)
        secret_file.chmod(0o600)
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "butterfly.worker", "--listen", "127.0.0.1:0",
                "--metrics-listen", "127.0.0.1:0", "--model", "tests.models:slow_loading_mlp",
                "--secret-file", str(secret_file), "--threads", "1",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            env={**os.environ, "BUTTERFLY_TEST_LOAD_S": str(load_s)},
        )  # fmt: skip
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.metrics_url = self._wait_for(r"metrics on (http://\S+)/metrics")
        self.address = self.node_id = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def _wait_for(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                continue
            if match := re.search(pattern, line):
                return " ".join(match.groups())
        raise AssertionError(f"the worker never printed {pattern!r}")

    def wait_ready(self) -> str:
        self.address, self.node_id = self._wait_for(r"ready on (\S+) node (\S+)").split()
        return self.address

    def get(self, path: str, method: str = "GET") -> tuple[int, str]:
        request = urllib.request.Request(self.metrics_url + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(tmp_path)
    try:
        yield w
    finally:
        w.stop()


def test_health_is_503_while_loading_then_without_a_placement_then_200(tmp_path: Path) -> None:
    worker = Worker(tmp_path, load_s=3.0)  # its model takes 3 s to build
    try:
        _health_follows_the_worker(worker)
    finally:
        worker.stop()


def _health_follows_the_worker(worker: Worker) -> None:
    status, body = worker.get("/health")
    assert (status, json.loads(body)["status"]) == (503, "loading")
    address = worker.wait_ready()
    status, body = worker.get("/health")
    assert status == 503
    assert json.loads(body) == {
        "status": "unassigned",
        "reason": "no coordinator placed stages here",
    }
    with Butterfly.connect([address], secret=SECRET) as b:
        x = torch.randn(1, 64)
        b.infer(x)
        status, body = worker.get("/health")
        assert status == 200
        assert json.loads(body)["status"] == "ok" and json.loads(body)["stages"] == ["0-5"]


def test_metrics_count_the_requests_the_worker_computed(worker: Worker) -> None:
    address = worker.wait_ready()
    with Butterfly.connect([address], secret=SECRET) as b:
        for _ in range(5):
            x = torch.randn(2, 64)
            with torch.inference_mode():
                expected = mlp()(x)
            assert torch.equal(b.infer(x), expected)
        coordinator = b._system.coordination.node_id
        status, text = worker.get("/metrics")
    assert status == 200
    series = samples(text)
    node = (("node", worker.node_id),)
    assert series[("butterfly_worker_computations_total", node)] == 5
    assert series[("butterfly_worker_stage_compute_seconds_total", (("layers", "0-5"), *node))] > 0
    assert (
        series[("butterfly_worker_weights_bytes", (("layers", "0-5"), *node))] == MLP_WEIGHT_BYTES
    )
    assert series[("butterfly_worker_queue_depth", node)] == 0
    assert series[("butterfly_kv_cache_bytes", node)] == 0
    received = series[
        ("butterfly_worker_bytes_total", (("direction", "in"), *node, ("peer", coordinator)))
    ]
    sent = series[
        ("butterfly_worker_bytes_total", (("direction", "out"), *node, ("peer", coordinator)))
    ]
    assert received > 5 * 2 * 64 * 4 and sent > 5 * 2 * 64 * 4
    assert series[("process_resident_memory_bytes", ())] > 50 << 20


def test_the_metrics_port_serves_only_metrics_and_health_and_not_the_secret(worker: Worker) -> None:
    worker.wait_ready()
    assert worker.get("/metrics", method="POST")[0] == 405
    assert worker.get("/")[0] == 404
    assert worker.get("/admin")[0] == 404
    status, text = worker.get("/metrics")
    assert status == 200 and SECRET not in text


def test_top_shows_each_worker_its_state_stages_and_links(worker: Worker) -> None:
    address = worker.wait_ready()
    with Butterfly.connect([address], secret=SECRET) as b:
        b.infer(torch.randn(1, 64))
        shown = subprocess.run(
            [sys.executable, "-m", "butterfly", "top", "--once", "--interval", "0.2", worker.metrics_url],
            capture_output=True, text=True, timeout=30, env={**os.environ, "COLUMNS": "200"},
        )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert worker.node_id in shown.stdout
    assert "ok" in shown.stdout and "0-5 (" in shown.stdout
    assert "←" in shown.stdout  # bytes from the coordinator


def test_top_refuses_a_non_positive_interval() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "butterfly", "top", "--interval", "0", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert shown.returncode == 2
    assert "--interval must be a positive number of seconds, got 0.0" in shown.stderr
