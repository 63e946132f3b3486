"""Run the whole suite many times under the conditions a fresh machine may have; report flakes.

``python -m tests.stress --runs 10`` (or ``nox -s stress -- --runs 10``) runs pytest ``--runs``
times in a row. Run *i* varies, deterministically from ``--seed``:

* torch's intra-op threads: 1 and 2 alternately (``OMP_NUM_THREADS``, read by torch at start-up
  in the test process and in every worker process the tests start);
* load: every other pair of runs has ``--load`` CPU-burning processes beside it;
* order: pytest-randomly shuffles the tests with seed ``seed + i``, printed so that a failing
  order can be replayed with ``pytest -p randomly --randomly-seed=S``.

At the end it prints each test that failed, in how many runs and under which conditions, and
exits 1 if any did. Nothing is retried: a test that fails once is reported.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs


@attrs.frozen
class Variant:
    """The conditions of one run."""

    threads: int
    load: int
    seed: int

    def describe(self) -> str:
        return f"threads={self.threads} load={self.load} seed={self.seed}"


@attrs.frozen
class Outcome:
    variant: Variant
    seconds: float
    tests: int
    #: test id → first line of its failure or error message
    failed: dict[str, str]


def variants(runs: int, *, load: int, seed: int) -> list[Variant]:
    """Threads alternate every run and load every two runs, so all four pairs occur in 4 runs."""
    return [
        Variant(threads=1 + i % 2, load=load if (i // 2) % 2 else 0, seed=seed + i)
        for i in range(runs)
    ]


def _burn() -> None:  # pragma: no cover - runs in a child process until terminated
    while True:
        pass


@contextlib.contextmanager
def burning(processes: int) -> Iterator[None]:
    """``processes`` busy loops beside the run: a loaded machine."""
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(processes)]
    for p in burners:
        p.start()
    try:
        yield
    finally:
        for p in burners:
            p.terminate()
        for p in burners:
            p.join()


def failures(junit: Path) -> tuple[int, dict[str, str]]:
    """The number of tests in a junit XML report and the failed or erroring ones."""
    failed: dict[str, str] = {}
    root = ET.parse(junit).getroot()
    count = 0
    for case in root.iter("testcase"):
        count += 1
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                message = (node.get("message") or node.text or kind).strip().splitlines()
                failed[name] = message[0][:200] if message else kind
    return count, failed


def run_once(variant: Variant, pytest_args: Sequence[str], report_dir: Path) -> Outcome:
    junit = report_dir / f"run-{variant.seed}.xml"
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        "-p", "randomly", f"--randomly-seed={variant.seed}",
        f"--junitxml={junit}", *pytest_args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(variant.threads)}
    started = time.monotonic()
    with burning(variant.load):
        subprocess.run(command, env=env, check=False, stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    if not junit.exists():
        return Outcome(variant, seconds, 0, {"<pytest>": "no report: pytest did not run"})
    count, failed = failures(junit)
    return Outcome(variant, seconds, count, failed)


def summary(outcomes: Sequence[Outcome]) -> str:
    lines = [f"{len(outcomes)} runs"]
    for o in outcomes:
        lines.append(
            f"  {o.variant.describe():<32} {o.tests} tests, {len(o.failed)} failed, {o.seconds:.0f} s"
        )
    by_test: dict[str, list[Outcome]] = {}
    for o in outcomes:
        for name in o.failed:
            by_test.setdefault(name, []).append(o)
    if not by_test:
        lines.append("no test failed")
    for name, seen in sorted(by_test.items(), key=lambda item: -len(item[1])):
        lines.append(f"FLAKY {name}: failed {len(seen)}/{len(outcomes)} runs")
        for o in seen:
            lines.append(f"    {o.variant.describe()}: {o.failed[name]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.stress", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=10, help="full runs of the suite (default 10)")
    parser.add_argument(
        "--load", type=int, default=os.cpu_count() or 2,
        help="CPU-burning processes beside a loaded run (default: one per core)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1, help="pytest-randomly seed of the first run")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="butterfly-stress-") as tmp:
        for variant in variants(args.runs, load=args.load, seed=args.seed):
            outcome = run_once(variant, args.pytest_args, Path(tmp))
            print(
                f"{variant.describe()}: {outcome.tests} tests, {len(outcome.failed)} failed "
                f"({', '.join(outcome.failed) or 'none'}), {outcome.seconds:.0f} s",
                flush=True,
            )
            outcomes.append(outcome)
    print(summary(outcomes))
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
