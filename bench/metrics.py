"""What metrics cost: throughput with metrics on vs off, side by side (target: <= 2 %).

Two workloads, each through ``Butterfly.local`` worker processes, runs interleaved
(on, off, on, off, ...), medians:

* the reference workload (``bench.pipeline``: 12 transformer layers over 2 workers, 4
  requests in flight): what a real pipeline pays;
* a small one (the 6-layer 64-wide mlp over 2 workers, 8 in flight, thousands of
  requests per second), where a fixed per-request cost shows most.

Metrics off is ``metrics.enabled = false``: no event is recorded. Besides throughput (which
this machine's noise swamps at the 2 % scale), it reports the client process's CPU time
per request, on and off: the coordinator and its metrics service run there, so the
difference is what metrics cost, and against the pipeline's period per request it is the
share of the machine's time they take. The workers append
their stage timings to each request either way (a few dozen bytes per hop).

Run it as ``python -m bench.metrics [--runs N] [--duration S]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch

from butterfly import Butterfly

from .baselines import reference_input
from .pipeline import MODEL, sustained_throughput

TARGET = 0.02


def throughput(
    model: str, x: Any, *, enabled: bool, in_flight: int, duration_s: float
) -> tuple[float, float]:
    """Requests/s, and the client process's CPU seconds per request (the coordinator, where
    the metrics service runs, is in this process; the workers are not)."""
    config = {
        "scheduling": {"max_in_flight": in_flight},
        "partition": {"default_strategy": "uniform"},
        "metrics": {"enabled": enabled},
    }
    with Butterfly.local(model, workers=2, threads=1, config=config) as b:
        cpu = time.process_time()
        rate = sustained_throughput(b, x, in_flight=in_flight, duration_s=duration_s)
        cpu = time.process_time() - cpu
        if enabled:
            assert b.metrics().requests_completed > 0
        return rate, cpu / (rate * duration_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.metrics", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=5, help="interleaved runs of each (default 5)")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per run (default 8)")
    args = parser.parse_args(argv)
    workloads = {
        "reference": (MODEL, reference_input(), 4),
        "small mlp": ("butterfly.model.zoo:mlp", torch.randn(1, 64), 8),
    }
    started = time.perf_counter()
    lines = []
    for name, (model, x, in_flight) in workloads.items():
        samples: dict[bool, list[float]] = {True: [], False: []}
        cpus: dict[bool, list[float]] = {True: [], False: []}
        for run in range(args.runs):
            for enabled in (True, False):
                rate, cpu = throughput(
                    model, x, enabled=enabled, in_flight=in_flight, duration_s=args.duration
                )
                samples[enabled].append(rate)
                cpus[enabled].append(cpu)
                state = "on" if enabled else "off"
                print(
                    f"run {run + 1}/{args.runs} {name} metrics {state}: {rate:.1f} req/s",
                    file=sys.stderr,
                    flush=True,
                )
        on, off = statistics.median(samples[True]), statistics.median(samples[False])
        cost = 1 - on / off
        verdict = "met" if cost <= TARGET else "MISSED"
        # The client's CPU per request with and without metrics, against the time one
        # request takes at the pipeline's pace (1 / throughput): the share metrics take of
        # the cores the workers also need.
        cpu_on, cpu_off = statistics.median(cpus[True]), statistics.median(cpus[False])
        share = (cpu_on - cpu_off) * off
        lines.append(
            f"  {name:<10} client CPU per request: on {cpu_on * 1e6:.0f} us, off "
            f"{cpu_off * 1e6:.0f} us: metrics take {share:+.2%} of a request's period "
            f"(target <= {TARGET:.0%}: {'met' if share <= TARGET else 'MISSED'})"
        )
        lines.append(
            f"  {name:<10} on {on:9.1f} req/s  off {off:9.1f} req/s  cost {cost:+.1%}  "
            f"(target <= {TARGET:.0%}: {verdict})   on {' '.join(f'{v:.1f}' for v in samples[True])}"
            f" / off {' '.join(f'{v:.1f}' for v in samples[False])}"
        )
    print(
        f"Metrics on vs off, {args.runs} interleaved runs of {args.duration:g} s ({time.perf_counter() - started:.0f} s)"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
