"""Continuous batching: concurrent generations with and without sharing a session.

    python -m bench.batching [--clients 8] [--tokens 32] [--runs 3]

``--clients`` callers each generate ``--tokens`` tokens after a prompt of 8 to 24 tokens,
starting ``--stagger`` ms apart, against a Llama-shaped model (random weights) on 2 local
worker processes. Without micro-batching every generation is a session of its own and
their steps are pipelined; with it (``dispatch_batch_size`` = clients) they share one
session: later callers join it at its next step, finished ones leave. Reported: total
generated tokens per second, and the pipeline requests it took (a shared step is one).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from butterfly import Butterfly

from .models import save_model


def run_clients(b: Butterfly, prompts: list[np.ndarray], tokens: int, stagger_s: float) -> float:
    """Generated tokens per second, the callers in threads started ``stagger_s`` apart."""
    outputs: list[np.ndarray] = []
    threads = []
    begin = time.perf_counter()
    for prompt in prompts:
        thread = threading.Thread(
            target=lambda p=prompt: outputs.append(b.generate(p, max_new_tokens=tokens))
        )
        thread.start()
        threads.append(thread)
        time.sleep(stagger_s)
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - begin
    assert len(outputs) == len(prompts)
    return len(prompts) * tokens / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.batching", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--stagger", type=float, default=20.0, help="ms between callers")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    prompts = [
        rng.integers(3, 32000, size=(1, int(rng.integers(8, 25))), dtype=np.int64)
        for _ in range(args.clients)
    ]
    results: dict[str, list[float]] = {"separate sessions": [], "continuous batching": []}
    requests: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_model(Path(tmp) / "llama", args.hidden, args.layers, 32000)
        configs = {
            "separate sessions": {"partition": {"default_strategy": "uniform"}},
            "continuous batching": {
                "partition": {"default_strategy": "uniform"},
                "scheduling": {"dispatch_batch_size": args.clients, "max_batch_wait_ms": 5.0},
            },
        }
        clients = {
            name: Butterfly.local(f"hf:{directory}", workers=2, threads=1, config=config)
            for name, config in configs.items()
        }
        try:
            for _ in range(args.runs):
                for name, b in clients.items():
                    before = int(b.metrics().requests_completed)  # type: ignore[call-overload]
                    results[name].append(run_clients(b, prompts, args.tokens, args.stagger / 1000))
                    requests[name] = int(b.metrics().requests_completed) - before  # type: ignore[call-overload]
        finally:
            for b in clients.values():
                b.close()
    base = statistics.median(results["separate sessions"])
    print(
        f"{args.clients} callers × {args.tokens} tokens, {args.stagger:g} ms apart; "
        f"Llama {args.hidden}×{args.layers} on 2 workers × 1 thread"
    )
    for name, values in results.items():
        median = statistics.median(values)
        print(
            f"{name:20s} {median:7.1f} tokens/s (runs {', '.join(f'{v:.1f}' for v in values)}) "
            f"= {median / base:.2f}×; {requests[name]} pipeline requests in the last run"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
