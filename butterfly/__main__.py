"""``python -m butterfly demo``: split a model over local worker processes and compare to a
local forward. ``python -m butterfly top URL ...``: a live view of workers (see :mod:`.top`)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from . import Butterfly
from .model import import_factory

DEFAULT_MODEL = "butterfly.model.zoo:small_transformer"


def demo(model: str, workers: int, batch: int, seq: int, requests: int, threads: int) -> int:
    print(f"starting {workers} local workers serving {model} ...", flush=True)
    t0 = time.perf_counter()
    with Butterfly.local(model, workers=workers, threads=threads) as b:
        print(f"cluster ready in {time.perf_counter() - t0:.1f} s")
        cluster = b.cluster()
        print(cluster)
        spec = cluster.input_spec
        features = spec.trailing[-1] if spec.trailing else 64
        shape = (batch, seq, features) if spec.min_ndim >= 3 else (batch, features)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))

        latencies = []
        for _ in range(requests):
            t = time.perf_counter()
            y = b.infer(x)
            latencies.append(time.perf_counter() - t)

        torch.set_num_threads(threads)
        with torch.inference_mode():
            local_model = import_factory(model)()
            t = time.perf_counter()
            reference = local_model(x)
            local_s = time.perf_counter() - t
        diff = (y - reference).abs().max().item()
        print(f"input shape     {tuple(x.shape)}")
        print(f"output shape    {tuple(y.shape)} {y.dtype}")
        print(f"max |distributed - local| = {diff:.3g}")
        print(
            f"latency over {requests} requests: median {statistics.median(latencies) * 1e3:.1f} ms, "
            f"min {min(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms "
            f"(local forward {local_s * 1e3:.1f} ms)"
        )
    ok = diff <= 1e-4
    print("demo OK" if ok else "demo FAILED: outputs differ")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m butterfly")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="run a model on local workers and compare with a local forward")
    d.add_argument("--model", default=DEFAULT_MODEL, help=f"import path (default {DEFAULT_MODEL})")
    d.add_argument("--workers", type=int, default=3)
    d.add_argument("--batch", type=int, default=4)
    d.add_argument("--seq", type=int, default=32)
    d.add_argument("--requests", type=int, default=20)
    d.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    t = sub.add_parser("top", help="a live view of workers, read from their /metrics")
    t.add_argument(
        "urls",
        nargs="+",
        metavar="URL",
        help="a worker's --metrics-listen address, e.g. http://10.0.0.5:9100",
    )
    t.add_argument(
        "--interval", type=float, default=1.0, help="seconds between refreshes (default 1)"
    )
    t.add_argument(
        "--once", action="store_true", help="print one table (rates over one interval) and exit"
    )
    args = parser.parse_args(argv)
    if args.command == "top":
        from .errors import ButterflyError
        from .top import watch

        urls = [u if "://" in u else f"http://{u}" for u in args.urls]
        try:
            watch(urls, interval=args.interval, once=args.once)
        except ButterflyError as exc:
            print(f"python -m butterfly top: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            pass
        return 0
    return demo(args.model, args.workers, args.batch, args.seq, args.requests, args.threads)


if __name__ == "__main__":
    sys.exit(main())
