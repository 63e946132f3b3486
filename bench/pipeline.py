"""Pipelined throughput on the reference workload: Butterfly vs a local forward vs GPipe.

    python -m bench.pipeline [--runs 5] [--duration 8] [--json out.json]

All three run side by side in one invocation, interleaved run by run, on the reference
workload of DESIGN.md (12 transformer layers, d_model 768, input (1, 128, 768)):

* local: one process, one torch thread (``bench.baselines.local_throughput``);
* GPipe: ``torch.distributed.pipelining.ScheduleGPipe``, gloo, 2 ranks × 1 thread,
  split at layer 6, 8 micro-batches (``bench.baselines.gpipe_throughput``);
* Butterfly: 2 worker processes × 1 thread, split at layer 6 (uniform placement), the
  coordinator in this process keeping ``--in-flight`` requests in the pipeline.

Targets (issue 3): Butterfly ≥ 1.85× local (the limit on 2 cores is 2.0×) and
≥ 1.05× GPipe. Speed is never asserted in the test suite; this prints the ratios.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from butterfly import Butterfly

from .baselines import gpipe_throughput, local_throughput, reference_input

MODEL = "butterfly.model.zoo:reference_transformer"


def sustained_throughput(b: Butterfly, x: Any, *, in_flight: int, duration_s: float) -> float:
    """Requests/s with ``in_flight`` requests always outstanding: a new one is submitted as
    soon as the oldest finishes, so the pipeline never drains between rounds."""
    window = collections.deque(b.submit(x) for _ in range(in_flight))
    for _ in range(2 * in_flight):  # warm-up: every stage has run a few times
        window.popleft().result()
        window.append(b.submit(x))
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < duration_s:
        window.popleft().result()
        done += 1
        window.append(b.submit(x))
    elapsed = time.perf_counter() - start
    for handle in window:
        handle.result()
    return done / elapsed


def butterfly_throughput(
    duration_s: float, *, in_flight: int = 4, workers: int = 2, threads: int = 1
) -> float:
    """Requests/s through ``workers`` local worker processes split uniformly (at layer 6 for 2),
    with ``in_flight`` requests always in the pipeline."""
    config = {
        "scheduling": {"max_in_flight": in_flight},
        "partition": {"default_strategy": "uniform"},
    }
    with Butterfly.local(MODEL, workers=workers, threads=threads, config=config) as b:
        return sustained_throughput(
            b, reference_input(), in_flight=in_flight, duration_s=duration_s
        )


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.pipeline", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="interleaved runs of each system (default 5)"
    )
    parser.add_argument(
        "--duration", type=float, default=8.0, help="seconds measured per run (default 8)"
    )
    parser.add_argument(
        "--in-flight", type=int, default=4, help="Butterfly requests in the pipeline"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)

    systems: dict[str, Callable[[], float]] = {
        "local 1 thread": lambda: local_throughput(args.duration),
        "gpipe 2x1": lambda: gpipe_throughput(args.duration),
        "butterfly 2x1": lambda: butterfly_throughput(args.duration, in_flight=args.in_flight),
    }
    samples: dict[str, list[float]] = {name: [] for name in systems}
    started = time.perf_counter()
    for run in range(args.runs):
        for name, measure in systems.items():
            samples[name].append(measure())
            print(
                f"run {run + 1}/{args.runs} {name:>15}: {samples[name][-1]:.3f} req/s",
                file=sys.stderr,
                flush=True,
            )
    results: dict[str, Any] = {name: summarize(values) for name, values in samples.items()}
    local = results["local 1 thread"]["median"]
    gpipe = results["gpipe 2x1"]["median"]
    ours = results["butterfly 2x1"]["median"]
    results["ratios"] = {
        "butterfly/local": ours / local,
        "gpipe/local": gpipe / local,
        "butterfly/gpipe": ours / gpipe,
    }
    print(
        f"Reference workload, {args.runs} interleaved runs of {args.duration:g} s ({time.perf_counter() - started:.0f} s)"
    )
    print(f"  {'system':<16}{'median':>10}{'min':>10}{'max':>10}   req/s")
    for name in systems:
        r = results[name]
        print(f"  {name:<16}{r['median']:>10.3f}{r['min']:>10.3f}{r['max']:>10.3f}")
    ratios = results["ratios"]
    print(f"  butterfly / local   {ratios['butterfly/local']:.2f}   (target >= 1.85, limit 2.0)")
    print(f"  gpipe / local       {ratios['gpipe/local']:.2f}")
    print(f"  butterfly / gpipe   {ratios['butterfly/gpipe']:.2f}   (target >= 1.05)")
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, **results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
