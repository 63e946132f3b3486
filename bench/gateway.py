"""What the HTTP gateway costs: streaming chat through ``/v1/chat/completions`` vs ``b.stream``
directly, same workers, same run (targets: >= 0.95x tokens/s, TTFT + <= 5 ms); then 32
concurrent streaming clients with continuous batching on (all complete, none starved).

Two local worker processes serve the tiny chat Llama of the test suite (its tokenizer
and chat template, greedy decoding). A gateway process and a direct client are both
coordinators of those workers; runs alternate between them and the medians are
reported. Tokens/s of a request is its tokens after the first divided by the time from
its first to its last; TTFT is from sending to the first piece of text.

Run it as ``python -m bench.gateway [--runs N] [--tokens N]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from butterfly import Butterfly, LocalCluster
from tests.e2e.test_gateway import KEY, MESSAGES, MODEL, GatewayProcess
from tests.text_models import save_chat_llama

#: One client per thread, kept: a new httpx.Client costs ~20 ms (it builds an SSL context),
#: which is the HTTP client's cost, not the gateway's.
_clients = threading.local()


def through_gateway(url: str, tokens: int) -> tuple[float, float, int]:
    """(TTFT s, tokens/s, tokens) of one streamed chat through the gateway."""
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    if not hasattr(_clients, "client"):
        _clients.client = httpx.Client(timeout=60)
    client = _clients.client
    with client.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers=headers
    ) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                count = chunk["usage"]["completion_tokens"]
    return first - start, (count - 1) / (last - first), count


def direct(b: Butterfly, tokens: int) -> tuple[float, float, int]:
    """The same chat through ``b.stream`` of its token ids (and their EOS), step by step."""
    assert b.tokenizer is not None
    start = time.perf_counter()
    ids = np.array([b.tokenizer.encode_chat(MESSAGES)])
    first = last = 0.0
    count = 0
    for _ in b.stream(ids, max_new_tokens=tokens):
        count += 1
        last = time.perf_counter()
        first = first or last
    return first - start, (count - 1) / (last - first), count


def concurrent_clients(url: str, clients: int, tokens: int) -> list[tuple[float, int]]:
    """(seconds, tokens) of each of ``clients`` streams started at once."""
    results: list[tuple[float, int]] = [(0.0, 0)] * clients

    def run(i: int) -> None:
        start = time.perf_counter()
        _, _, count = through_gateway(url, tokens)
        results[i] = (time.perf_counter() - start, count)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp())
    model = save_chat_llama(root / "chatllama", eos=[95])  # a token it rarely picks
    config = "[scheduling]\ndispatch_batch_size = 32\nmax_batch_wait_ms = 2\n"
    with LocalCluster(f"hf:{model}", workers=2, threads=1) as cluster:
        gateway = GatewayProcess(cluster, root, "--tokenizer", str(model), config=config)
        try:
            with Butterfly.connect(
                cluster.addresses,
                secret=cluster.secret,
                tokenizer=model,
                config={"scheduling": {"dispatch_batch_size": 32, "max_batch_wait_ms": 2}},
            ) as b:
                direct(b, 8), through_gateway(gateway.url, 8)  # warm both paths
                ours, theirs = [], []
                for _ in range(args.runs):
                    theirs.append(direct(b, args.tokens))
                    ours.append(through_gateway(gateway.url, args.tokens))
            crowd = concurrent_clients(gateway.url, args.clients, args.tokens)
        finally:
            gateway.close()
    ttft_g = statistics.median(r[0] for r in ours) * 1000
    ttft_d = statistics.median(r[0] for r in theirs) * 1000
    tps_g = statistics.median(r[1] for r in ours)
    tps_d = statistics.median(r[1] for r in theirs)
    print(f"tokens per request: gateway {ours[0][2]}, direct {theirs[0][2]}")
    print(
        f"tokens/s   gateway {tps_g:8.1f}  direct {tps_d:8.1f}  ratio {tps_g / tps_d:.3f} (target >= 0.95)"
    )
    print(
        f"TTFT ms    gateway {ttft_g:8.2f}  direct {ttft_d:8.2f}  extra {ttft_g - ttft_d:+.2f} ms (target <= +5)"
    )
    times = [t for t, _ in crowd]
    counts = [c for _, c in crowd]
    print(
        f"{args.clients} concurrent streams: {sum(c == args.tokens for c in counts)} of {len(counts)} "
        f"got all {args.tokens} tokens; seconds min {min(times):.2f} median "
        f"{statistics.median(times):.2f} max {max(times):.2f}"
    )
    ok = all(c == args.tokens for c in counts)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
