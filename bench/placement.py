"""Placement: planning time, and quality vs measured throughput per strategy.

    python -m bench.placement [--runs 5] [--duration 5] [--json out.json]

1. Planning time (median of ``--runs``) of ``topology_aware`` for 100 layers × 16 nodes
   (the order-search heuristic; target < 50 ms) and for 12 nodes with the exact subset DP
   (12 and 100 layers), on random heterogeneous instances.
2. A heterogeneous local cluster: 3 workers serving ``tests.models:throttled`` (8 layers
   of 20 ms), one of them 4× slower (``BUTTERFLY_TEST_SLOWDOWN=4``, measured by the worker
   itself at start-up). For each strategy: its ``PartitionQuality`` and the throughput
   measured with 4 requests in flight. The layers sleep rather than compute, so the
   figures do not depend on how many cores the machine has.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from butterfly import Butterfly, LocalCluster
from butterfly.partition import plan
from butterfly.types import LayerInfo, NodeCapability

from .pipeline import sustained_throughput

STRATEGIES = ("uniform", "load_balanced", "topology_aware")


def random_instance(
    layers: int, nodes: int, seed: int
) -> tuple[list[LayerInfo], list[NodeCapability]]:
    rng = random.Random(seed)
    return (
        [
            LayerInfo(i, rng.uniform(1, 10), rng.randint(10**6, 10**8), rng.randint(10**5, 10**7))
            for i in range(layers)
        ],
        [NodeCapability(f"n{a}", rng.uniform(0.25, 4), 10**10) for a in range(nodes)],
    )


def planning_ms(layers: int, nodes: int, runs: int) -> dict[str, float]:
    times = []
    for seed in range(runs):
        layer_infos, node_infos = random_instance(layers, nodes, seed)
        start = time.perf_counter()
        plan(layer_infos, node_infos, "topology_aware")
        times.append((time.perf_counter() - start) * 1000)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def heterogeneous(duration_s: float, runs: int) -> dict[str, Any]:
    slow = {"BUTTERFLY_TEST_SLOWDOWN": "4"}
    rows: dict[str, Any] = {}
    with LocalCluster("tests.models:throttled", workers=3, worker_env=[{}, {}, slow]) as cluster:
        names = {
            p.node_id: ("slow" if i == 2 else f"fast{i}") for i, p in enumerate(cluster.processes)
        }
        samples: dict[str, list[float]] = {s: [] for s in STRATEGIES}
        for _ in range(runs):
            for strategy in STRATEGIES:
                config = {
                    "partition": {"default_strategy": strategy},
                    "scheduling": {"max_in_flight": 4},
                }
                with Butterfly.connect(cluster.addresses, config=config) as b:
                    info = b.cluster()
                    rate = sustained_throughput(
                        b, torch.zeros(1, 64), in_flight=4, duration_s=duration_s
                    )
                    samples[strategy].append(rate)
                    rows[strategy] = {
                        "stages": [f"{names[s.node_id]}:{len(s.layers)}" for s in info.stages],
                        "quality": attrs.asdict(info.quality) if info.quality else None,
                    }
        for strategy in STRATEGIES:
            values = samples[strategy]
            rows[strategy]["measured_rps"] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
            }
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.placement", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--duration", type=float, default=5.0, help="seconds of requests per throughput sample"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    timing = {
        "100 layers x 16 nodes (heuristic)": planning_ms(100, 16, args.runs),
        "12 layers x 12 nodes (exact)": planning_ms(12, 12, args.runs),
        "100 layers x 12 nodes (exact)": planning_ms(100, 12, max(1, args.runs // 2)),
    }
    print("Planning time, topology_aware, ms (median / min / max)")
    for name, t in timing.items():
        print(f"  {name:<36}{t['median']:>9.1f}{t['min']:>9.1f}{t['max']:>9.1f}")
    rows = heterogeneous(args.duration, args.runs)
    print("\nHeterogeneous cluster: 3 workers, one 4x slower; 8 layers of 20 ms (slow: 80 ms)")
    print(
        f"  {'strategy':<16}{'stages':<28}{'est. req/s':>11}{'balance':>9}{'measured req/s (med/min/max)':>32}"
    )
    for strategy, row in rows.items():
        q, m = row["quality"], row["measured_rps"]
        print(
            f"  {strategy:<16}{' '.join(row['stages']):<28}{q['estimated_throughput_rps']:>11.2f}"
            f"{q['load_balance']:>9.2f}{m['median']:>14.2f}{m['min']:>9.2f}{m['max']:>9.2f}"
        )
    ratio = (
        rows["topology_aware"]["measured_rps"]["median"] / rows["uniform"]["measured_rps"]["median"]
    )
    print(f"  topology_aware / uniform measured throughput: {ratio:.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps({"planning_ms": timing, "heterogeneous": rows, "ratio": ratio}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
