"""Fault report: requests submitted / completed / lost / duplicated / wrong under injected
faults, and recovery time from a kill to the first request completed on the new placement.

    python -m bench.faults [--seeds 200] [--kills 3] [--stops 1] [--json out.json]

* memory: ``--seeds`` runs of 3 workers + a coordinator in one process over the seeded
  fault transport (5 % drop, 5 % duplicate, 5 % reorder; tests/chaos.py), 4 requests each;
* sigkill: 3 real worker processes, 100 requests kept 8 in flight; one random worker
  holding a stage (by seed) is SIGKILLed after a random number of requests (``--kills`` seeds);
* sigstop: the same with SIGSTOP instead (the process keeps its sockets open, so only the
  phi-accrual detector can tell), default heartbeat settings: 1 s interval, 3 s pause.

Recovery time: from the kill (or stop) to the first request that completed after the
coordinator's placement epoch changed.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import trio

from butterfly import AsyncButterfly, LocalCluster
from butterfly.model import ModelSource
from butterfly.model.zoo import mlp
from tests.chaos import run_seeds

MODEL = "butterfly.model.zoo:mlp"
REQUESTS = 100
IN_FLIGHT = 8


def memory_report(seeds: int) -> dict[str, Any]:
    start = time.perf_counter()
    totals, faults, _ = run_seeds(range(seeds), ModelSource(MODEL, profile=False))
    return {
        "seeds": seeds,
        "faults": dict(faults),
        **totals,
        "wall_s": time.perf_counter() - start,
    }


def _reference(x: torch.Tensor) -> torch.Tensor:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return mlp()(x)
    finally:
        torch.set_num_threads(threads)


async def _process_run(seed: int, fault: str, config: dict[str, Any]) -> dict[str, Any]:
    rng = random.Random(seed)
    inputs = [
        torch.randn(1, 64, generator=torch.Generator().manual_seed(i)) for i in range(REQUESTS)
    ]
    expected = [_reference(x) for x in inputs]
    answers: collections.Counter[int] = collections.Counter()
    completions: list[tuple[float, int]] = []  # (time, placement epoch when it completed)
    wrong = failed = 0
    with LocalCluster(MODEL, workers=3, threads=1) as cluster:
        async with AsyncButterfly.connect(cluster.addresses, config=config) as b:
            # A worker that holds a stage: faulting an idle one interrupts nothing.
            serving = {s.node_id for s in b.cluster().stages}
            victim = rng.choice([p for p in cluster.processes if p.node_id in serving])
            fault_after = rng.randrange(10, 50)
            epoch_before = b.cluster().epoch
            slots = trio.Semaphore(IN_FLIGHT)
            faulted_at = 0.0

            async def one(i: int) -> None:
                nonlocal wrong, failed
                try:
                    y = await b.infer(inputs[i], timeout=120)
                except Exception:
                    failed += 1
                    return
                finally:
                    slots.release()
                answers[i] += 1
                completions.append((time.monotonic(), b.cluster().epoch))
                wrong += not torch.equal(y, expected[i])

            async with trio.open_nursery() as nursery:
                for i in range(REQUESTS):
                    await slots.acquire()
                    if i == fault_after:
                        faulted_at = time.monotonic()
                        victim.kill() if fault == "sigkill" else victim.suspend()
                    nursery.start_soon(one, i)
            if fault == "sigstop":
                victim.resume()
            metrics = b.metrics()
    recovered = [t for t, epoch in completions if t >= faulted_at and epoch > epoch_before]
    return {
        "seed": seed,
        "fault": fault,
        "submitted": REQUESTS,
        "completed": len(answers),
        "lost": REQUESTS - len(answers),
        "failed": failed,
        "duplicated": metrics.requests_completed - len(answers),
        "wrong": wrong,
        "retries": sum(metrics.requests_retried.values()),
        "recovery_s": recovered[0] - faulted_at if recovered else None,
    }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def process_report(fault: str, seeds: int) -> dict[str, Any]:
    config = {"scheduling": {"max_in_flight": IN_FLIGHT}}
    runs = [trio.run(_process_run, seed, fault, config) for seed in range(1, seeds + 1)]
    recoveries = [r["recovery_s"] for r in runs if r["recovery_s"] is not None]
    keys = ("submitted", "completed", "lost", "failed", "duplicated", "wrong", "retries")
    return {
        "fault": fault,
        "runs": runs,
        **{k: sum(r[k] for r in runs) for k in keys},
        "recovery_p50_s": _percentile(recoveries, 0.5),
        "recovery_p99_s": _percentile(recoveries, 0.99),
        "recovery_mean_s": statistics.fmean(recoveries) if recoveries else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    parser.add_argument("--seeds", type=int, default=200, help="in-memory seeded runs")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILL runs with real processes")
    parser.add_argument("--stops", type=int, default=1, help="SIGSTOP runs with real processes")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    report: dict[str, Any] = {}
    if args.seeds:
        memory = report["memory"] = memory_report(args.seeds)
        print(
            f"in-memory, {memory['seeds']} seeds × 4 requests, 5% drop/duplicate/reorder: "
            f"faults {memory['faults']}; submitted {memory['submitted']}, completed "
            f"{memory['completed']}, lost {memory['lost']}, duplicated {memory['duplicated']}, "
            f"wrong {memory['wrong']}, re-runs {memory['retries']} ({memory['wall_s']:.0f} s)"
        )
    for fault, seeds in (("sigkill", args.kills), ("sigstop", args.stops)):
        if not seeds:
            continue
        r = report[fault] = process_report(fault, seeds)
        p50, p99 = r["recovery_p50_s"], r["recovery_p99_s"]
        print(
            f"{fault} one of 3 worker processes, {seeds} runs × {REQUESTS} requests: submitted "
            f"{r['submitted']}, completed {r['completed']}, lost {r['lost']}, duplicated "
            f"{r['duplicated']}, wrong {r['wrong']}, re-runs {r['retries']}; recovery "
            f"p50 {p50 if p50 is None else f'{p50:.2f}'} s, "
            f"p99 {p99 if p99 is None else f'{p99:.2f}'} s "
            f"(each: {[None if x['recovery_s'] is None else round(x['recovery_s'], 2) for x in r['runs']]})"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    bad = sum(report[k]["lost"] + report[k]["duplicated"] + report[k]["wrong"] for k in report)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
