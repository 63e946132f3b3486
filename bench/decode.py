"""Per-token decode latency: a Llama-shaped model split into 2 stages vs one process.

    python -m bench.decode [--hidden 1024 --layers 8 --heads 16 --kv-heads 4] [--runs 5]
    python -m bench.decode --device cuda --dtype bfloat16 --hidden 2048 --layers 22 \\
        --heads 32 --kv-heads 4 --intermediate 5632          # the ~1B shape of issue 5

A model with random weights is saved with ``save_pretrained``; then, interleaved run by
run, greedy decoding of ``--tokens`` tokens after a ``--prompt``-token prompt:

* local: one process, a plain eager decode loop over the ``transformers`` model: one
  forward per token with its ``DynamicCache``, argmax (the issue's reference);
* generate: one process, ``transformers``' own ``generate`` (adds its per-step logic);
* butterfly-1: one worker process holding the whole model (the runtime's own overhead);
* butterfly-2: two worker processes, split in the middle (uniform placement): every step
  crosses from the coordinator to stage 1, to stage 2, and back.

ms/token is (time for 1 + N tokens − time for 1 token) / N, so the prompt's prefill is not
counted. Every system uses ``--threads`` torch threads per process (on a CPU the 2 stages
run one after the other, so each gets the cores a single process would). Target (issue 5,
on a GPU): butterfly-2 ≤ 1.15× local. Speed is never asserted in the test suite.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from butterfly import Butterfly
from butterfly.model.hf import SUPPORTED_DTYPES

from .models import save_model


def load_local(directory: Path, device: str, dtype: torch.dtype) -> Any:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        directory, dtype=dtype, local_files_only=True
    ).to(device)
    return model.eval()


def local_loop(model: Any, device: str) -> Callable[[Any, int], Any]:
    import transformers

    # The KV cache argument was renamed during transformers 5.x.
    cache_arg = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )

    def generate(prompt: Any, tokens: int) -> Any:
        cache = transformers.DynamicCache(config=model.config)
        ids, out = prompt.to(device), []
        with torch.inference_mode():
            for _ in range(tokens):
                logits = model(input_ids=ids, use_cache=True, **{cache_arg: cache}).logits
                ids = logits[:, -1].argmax(dim=-1, keepdim=True)
                out.append(ids)
        return torch.cat(out, dim=1).cpu()

    return generate


def local_generate(model: Any, device: str) -> Callable[[Any, int], Any]:
    def generate(prompt: Any, tokens: int) -> Any:
        with torch.inference_mode():
            out = model.generate(
                prompt.to(device),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, prompt.shape[1] :].cpu()

    return generate


def per_token_ms(generate: Callable[[Any, int], Any], prompt: Any, tokens: int) -> float:
    generate(prompt, 2)  # warm-up
    begin = time.perf_counter()
    first = generate(prompt, 1)
    one = time.perf_counter() - begin
    begin = time.perf_counter()
    out = generate(prompt, tokens + 1)
    many = time.perf_counter() - begin
    assert out.shape[1] == tokens + 1 and torch.equal(out[:, :1], first)
    return (many - one) / tokens * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", choices=sorted(SUPPORTED_DTYPES), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = SUPPORTED_DTYPES[args.dtype]
    prompt = torch.randint(
        3, args.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(0)
    )
    times: dict[str, list[float]] = {}
    outputs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_model(
            Path(tmp) / "llama",
            args.hidden,
            args.layers,
            args.vocab,
            heads=args.heads,
            kv_heads=args.kv_heads,
            intermediate=args.intermediate,
            dtype=dtype,
        )
        options: dict[str, Any] = {
            "threads": args.threads,
            "device": args.device,
            "extra_args": ["--dtype", args.dtype],
        }
        config = {"partition": {"default_strategy": "uniform"}}
        model = load_local(directory, args.device, dtype)
        systems: dict[str, Callable[[Any, int], Any]] = {
            "local": local_loop(model, args.device),
            "generate": local_generate(model, args.device),
        }
        with (
            Butterfly.local(f"hf:{directory}", workers=1, config=config, **options) as one,
            Butterfly.local(f"hf:{directory}", workers=2, config=config, **options) as two,
        ):
            stages = [(s.node_id, s.layers.start, s.layers.stop) for s in two.cluster().stages]
            for name, b in (("butterfly-1", one), ("butterfly-2", two)):
                systems[name] = lambda p, n, b=b: torch.as_tensor(b.generate(p, max_new_tokens=n))[
                    :, p.shape[1] :
                ]
            for _ in range(args.runs):
                for name, generate in systems.items():
                    times.setdefault(name, []).append(per_token_ms(generate, prompt, args.tokens))
            for name, generate in systems.items():
                outputs[name] = generate(prompt, args.tokens)
    local = statistics.median(times["local"])
    report: dict[str, Any] = {
        "args": vars(args) | {"json": None},
        "stages": stages,
        "ms_per_token": {},
    }
    print(
        f"model {args.hidden}×{args.layers} layers, {args.dtype} on {args.device}; 2 stages {stages}"
    )
    for name, values in times.items():
        median = statistics.median(values)
        report["ms_per_token"][name] = {"median": median, "runs": values}
        print(
            f"{name:12s} {median:8.2f} ms/token (runs {', '.join(f'{v:.2f}' for v in values)}) "
            f"= {median / local:.3f}× local"
        )
    same = all(torch.equal(outputs[n], outputs["local"]) for n in outputs)
    print(f"greedy tokens identical across systems: {same}")
    report["identical_tokens"] = same
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
