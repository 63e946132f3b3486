"""Generation with KV caches kept on the stages: tiny GPT-2 and Llama over 3 in-memory workers.

The reference is transformers' own ``generate`` on the same saved model: greedy outputs
must be identical token for token.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
import trio
import trio.lowlevel

from butterfly import AsyncButterfly
from butterfly.config import load_config
from butterfly.errors import ApiError
from butterfly.model import ModelSource
from butterfly.protocol import InputSpec
from butterfly.transport import MemoryNetwork
from butterfly.worker import WorkerService
from tests.hf_models import MODEL_CLASSES
from tests.inmemory import FAST, acquainted

DECODERS = ("gpt2", "llama")


def reference_generate(directory: Path, family: str, ids: torch.Tensor, new: int) -> torch.Tensor:
    model = getattr(transformers, MODEL_CLASSES[family]).from_pretrained(
        directory, attn_implementation="sdpa"
    )
    model.generation_config.eos_token_id = None  # run all ``new`` steps, like max_new_tokens
    with torch.inference_mode():
        out: torch.Tensor = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    return out


def prompt(batch: int = 2, seq: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 90, (batch, seq), generator=torch.Generator().manual_seed(seed))


async def concurrently(b: AsyncButterfly, *calls: tuple[torch.Tensor, int]) -> list[torch.Tensor]:
    """Each ``(prompt, max_new_tokens)`` generated at once, in a task of its own."""
    results: dict[int, torch.Tensor] = {}

    async def run(i: int, ids: torch.Tensor, new: int) -> None:
        results[i] = await b.generate(ids, max_new_tokens=new)

    async with trio.open_nursery() as nursery:
        for i, (ids, new) in enumerate(calls):
            nursery.start_soon(run, i, ids, new)
    return [results[i] for i in range(len(calls))]


class Cluster:
    """Three in-memory workers serving an ``hf:`` model, each killable."""

    def __init__(self) -> None:
        self.net = MemoryNetwork()
        self.scopes: list[trio.CancelScope] = []
        self.workers: list[WorkerService] = []

    async def start(self, nursery: trio.Nursery, directory: Path, config: Any = FAST) -> None:
        for i in range(3):
            worker = WorkerService(
                ModelSource(f"hf:{directory}", profile=False),
                transport=self.net,
                listen=f"mem://w{i}",
                peers=("mem://w0",) if i else (),
                config=load_config(config),
            )
            scope = trio.CancelScope()
            await nursery.start(_serve, scope, worker)
            self.scopes.append(scope)
            self.workers.append(worker)
        await acquainted(self.workers)


async def _serve(
    scope: trio.CancelScope, worker: WorkerService, task_status: trio.TaskStatus[None]
) -> None:
    with scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            task_status.started()


@pytest.mark.parametrize("family", DECODERS)
async def test_greedy_generation_equals_transformers_generate_token_for_token(
    family: str, saved: Callable[[str], Path]
) -> None:
    ids = prompt(batch=2)
    expected = reference_generate(saved(family), family, ids, 10)
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, saved(family))
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=FAST) as b:
            assert len(b.cluster().stages) == 3
            out = await b.generate(ids, max_new_tokens=10)
            assert torch.equal(out, expected)
            # The caches stayed on the stages: after the prompt, each step sent one token.
            assert b.metrics().requests_completed == 10
        nursery.cancel_scope.cancel()


async def test_two_concurrent_sessions_each_equal_their_own_local_generate(
    saved: Callable[[str], Path],
) -> None:
    directory = saved("llama")
    a, c = prompt(batch=1, seq=4, seed=1), prompt(batch=3, seq=6, seed=2)
    expected = [reference_generate(directory, "llama", x, 8) for x in (a, c)]
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, directory)
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=FAST) as b:
            results = await concurrently(b, (a, 8), (c, 8))
            assert torch.equal(results[0], expected[0])
            assert torch.equal(results[1], expected[1])
        nursery.cancel_scope.cancel()
        # Both sessions ended: no worker keeps their caches.
        assert all(w.sessions.statistics()["sessions"] == 0 for w in cluster.workers)


async def test_sampling_with_a_seed_is_reproducible(saved: Callable[[str], Path]) -> None:
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, saved("gpt2"))
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=FAST) as b:
            ids = prompt(batch=2)
            options = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "top_k": 40}
            first = await b.generate(ids, seed=7, top_p=0.95, **options)
            again = await b.generate(ids, seed=7, top_p=0.95, **options)
            other = await b.generate(ids, seed=8, top_p=0.95, **options)
            assert torch.equal(first, again)
            assert not torch.equal(first, other)
            assert torch.equal(first[:, :5], ids)
        nursery.cancel_scope.cancel()


async def test_a_stage_killed_mid_generation_is_replayed_with_identical_greedy_output(
    saved: Callable[[str], Path],
) -> None:
    directory = saved("gpt2")
    ids = prompt(batch=2)
    expected = reference_generate(directory, "gpt2", ids, 12)
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, directory)
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=FAST) as b:
            steps = []
            async for tokens in b.stream(ids, max_new_tokens=12):
                steps.append(tokens)
                if len(steps) == 4:
                    cluster.scopes[1].cancel()  # the middle stage's worker dies
            out = torch.cat([ids, torch.stack(steps, dim=1)], dim=1)
            assert torch.equal(out, expected)
            assert len(b.cluster().stages) == 2
            assert b.metrics().session_replays >= 1
        nursery.cancel_scope.cancel()


async def test_evicted_caches_are_rebuilt_by_replaying_the_session(
    saved: Callable[[str], Path],
) -> None:
    # A cache budget of one byte: each session's step evicts the other's caches.
    directory = saved("llama")
    config = {**FAST, "generation": {"kv_cache_bytes": 1}}
    a, c = prompt(batch=1, seq=4, seed=3), prompt(batch=1, seq=4, seed=4)
    expected = [reference_generate(directory, "llama", x, 6) for x in (a, c)]
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, directory, config)
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=FAST) as b:
            results = await concurrently(b, (a, 6), (c, 6))
            assert torch.equal(results[0], expected[0])
            assert torch.equal(results[1], expected[1])
            assert sum(w.sessions.evicted for w in cluster.workers) > 0
        nursery.cancel_scope.cancel()


async def test_numpy_prompt_gives_numpy_tokens_and_stop_ends_generation(
    saved: Callable[[str], Path],
) -> None:
    directory = saved("gpt2")
    ids = prompt(batch=1)
    greedy = reference_generate(directory, "gpt2", ids, 10)[0, 5:].tolist()
    stop = greedy[3]  # the 4th generated token
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, directory)
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=FAST) as b:
            out = await b.generate(ids.numpy(), max_new_tokens=10, stop=[stop])
            assert isinstance(out, np.ndarray) and out.dtype == np.int64
            first_stop = greedy.index(stop)
            assert out[0, 5:].tolist() == greedy[: first_stop + 1]
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("ids", "options", "message"),
    [
        (
            torch.tensor([[5, 6, 7], [-1, -1, -1]]),
            {},
            r"row 1 of input_ids is all padding \(negative ids\); every row needs at least one",
        ),
        (torch.ones(1, 3), {}, "input_ids must hold integers, got dtype float32"),
        (torch.ones(3, dtype=torch.int64), {}, r"shape \(batch, seq\) with both ≥ 1, got \(3,\)"),
        ("hello", {}, "a text prompt needs the model.s tokenizer: connect with tokenizer=DIR"),
        ([1, 2], {}, "input_ids must be a numpy array or torch tensor of token ids, got list"),
        (
            torch.ones(1, 3, dtype=torch.int64),
            {"max_new_tokens": 0},
            "max_new_tokens must be an int ≥ 1, got 0",
        ),
        (torch.ones(1, 3, dtype=torch.int64), {"temperature": 0}, "temperature must be > 0, got 0"),
        (
            torch.ones(1, 3, dtype=torch.int64),
            {"top_p": 1.5},
            r"top_p must be in \(0, 1\], got 1.5",
        ),
        (
            torch.ones(1, 3, dtype=torch.int64),
            {"stop": "x"},
            "stop must be a collection of token ids",
        ),
    ],
)
async def test_bad_generation_requests_are_api_errors_and_the_next_one_works(
    ids: Any, options: dict[str, Any], message: str, saved: Callable[[str], Path]
) -> None:
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, saved("gpt2"))
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=FAST) as b:
            with pytest.raises(ApiError, match=message):
                await b.generate(ids, **{"max_new_tokens": 2, **options})
            out = await b.generate(prompt(batch=1), max_new_tokens=2)
            assert out.shape == (1, 7)
        nursery.cancel_scope.cancel()


async def test_concurrent_sessions_with_batching_on_share_one_session_in_the_pipeline(
    saved: Callable[[str], Path],
) -> None:
    # Two callers, prompts of the same length, within the batching window: one session of
    # 1 + 2 rows runs in the pipeline, one request per step for both. The reference is
    # transformers' generate on the stacked prompts, row for row.
    directory = saved("llama")
    a, c = prompt(batch=1, seq=5, seed=5), prompt(batch=2, seq=5, seed=6)
    expected = reference_generate(directory, "llama", torch.cat([a, c]), 6)
    config = {**FAST, "scheduling": {"dispatch_batch_size": 8, "max_batch_wait_ms": 50.0}}
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, directory)
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=config) as b:
            results = await concurrently(b, (a, 3), (c, 6))  # a is done early: its row leaves
            assert torch.equal(results[0], expected[:1, :8])
            assert torch.equal(results[1], expected[1:])
            assert b.metrics().requests_completed == 6  # not 3 + 6
        nursery.cancel_scope.cancel()
        assert all(w.sessions.statistics()["sessions"] == 0 for w in cluster.workers)


BATCHING = {**FAST, "scheduling": {"dispatch_batch_size": 8, "max_batch_wait_ms": 50.0}}


@pytest.mark.parametrize("family", DECODERS)
async def test_prompts_of_different_lengths_share_a_session_and_each_equals_its_own_generate(
    family: str, saved: Callable[[str], Path]
) -> None:
    directory = saved(family)
    a, c = prompt(batch=1, seq=3, seed=7), prompt(batch=2, seq=7, seed=8)
    expected = [reference_generate(directory, family, x, 5) for x in (a, c)]
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, directory)
        async with AsyncButterfly.connect(
            ["mem://w0"], transport=cluster.net, config=BATCHING
        ) as b:
            results = await concurrently(b, (a, 5), (c, 5))
            assert torch.equal(results[0], expected[0])
            assert torch.equal(results[1], expected[1])
            assert b.metrics().requests_completed == 5  # one request per step for both
        nursery.cancel_scope.cancel()


async def _join_midway(
    b: AsyncButterfly, first: torch.Tensor, second: torch.Tensor, *, after: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``first`` generates 8 tokens; ``second`` (4 tokens) starts after ``after`` of them."""
    late: dict[str, torch.Tensor] = {}
    steps = []
    async with trio.open_nursery() as nursery:
        async for tokens in b.stream(first, max_new_tokens=8):
            steps.append(tokens)
            if len(steps) == after:

                async def run() -> None:
                    late["out"] = await b.generate(second, max_new_tokens=4)

                nursery.start_soon(run)
    return torch.cat([first, torch.stack(steps, dim=1)], dim=1), late["out"]


@pytest.mark.parametrize("family", DECODERS)
async def test_a_generation_joins_a_running_session_at_its_next_step(
    family: str, saved: Callable[[str], Path]
) -> None:
    directory = saved(family)
    a, c = prompt(batch=2, seq=4, seed=9), prompt(batch=1, seq=6, seed=10)
    expected = [
        reference_generate(directory, family, a, 8),
        reference_generate(directory, family, c, 4),
    ]
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, directory)
        async with AsyncButterfly.connect(
            ["mem://w0"], transport=cluster.net, config=BATCHING
        ) as b:
            first, second = await _join_midway(b, a, c, after=3)
            assert torch.equal(first, expected[0])
            assert torch.equal(second, expected[1])
            # The newcomer's 4 steps rode along the running session's: 8 requests, not 12.
            assert b.metrics().requests_completed == 8
        nursery.cancel_scope.cancel()
        assert all(w.sessions.statistics()["sessions"] == 0 for w in cluster.workers)


async def test_a_session_that_rows_joined_and_left_is_replayed_exactly_after_eviction(
    saved: Callable[[str], Path],
) -> None:
    # A one-byte cache budget and a second session running beside: steps find their
    # caches evicted and replay the padded rectangle of tokens from position 0.
    directory = saved("llama")
    a, c, d = prompt(batch=1, seq=4, seed=11), prompt(batch=1, seq=2, seed=12), prompt(2, 5, 13)
    expected = [
        reference_generate(directory, "llama", a, 8),
        reference_generate(directory, "llama", c, 4),
        reference_generate(directory, "llama", d, 10),
    ]
    # Two rows a session: d's two rows fill one, a and c share the other.
    config = {**FAST, "scheduling": {"dispatch_batch_size": 2, "max_batch_wait_ms": 0.0}}
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, directory, {**FAST, "generation": {"kv_cache_bytes": 1}})
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=config) as b:
            results: dict[str, torch.Tensor] = {}

            async def beside() -> None:
                results["d"] = await b.generate(d, max_new_tokens=10)

            async with trio.open_nursery() as sessions:
                sessions.start_soon(beside)
                await trio.lowlevel.checkpoint()
                first, second = await _join_midway(b, a, c, after=2)
            assert torch.equal(first, expected[0])
            assert torch.equal(second, expected[1])
            assert torch.equal(results["d"], expected[2])
            assert b.metrics().requests_completed == 8 + 10  # c rode along a's steps
            assert sum(w.sessions.evicted for w in cluster.workers) > 0
            assert b.metrics().session_replays > 0
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("family", DECODERS)
async def test_rows_padded_on_either_side_each_generate_what_they_would_alone(
    family: str, saved: Callable[[str], Path]
) -> None:
    directory = saved(family)
    rows = [prompt(batch=1, seq=n, seed=20 + n)[0].tolist() for n in (6, 3, 4)]
    padded = torch.tensor([rows[0], [*rows[1], -1, -1, -1], [-1, -1, *rows[2]]])
    expected = [reference_generate(directory, family, torch.tensor([r]), 5) for r in rows]
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, directory)
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=FAST) as b:
            out = await b.generate(padded, max_new_tokens=5)
            assert torch.equal(out[:, :6], padded)  # the prompt as given, then the new tokens
            for row, alone in zip(out, expected, strict=True):
                assert row[6:].tolist() == alone[0, -5:].tolist()
        nursery.cancel_scope.cancel()


async def test_a_worker_frees_idle_sessions_without_a_step_to_notice_them(
    saved: Callable[[str], Path],
) -> None:
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(
            nursery, saved("llama"), {**FAST, "generation": {"session_idle_s": 0.2}}
        )
        store = cluster.workers[1].sessions
        store.begin(("a vanished coordinator", 1, 1, 0), 0, 3)
        store.commit(("a vanished coordinator", 1, 1, 0), 3)
        assert store.statistics()["sessions"] == 1
        with trio.fail_after(5):
            while store.statistics()["sessions"]:  # noqa: ASYNC110 (a counter, no event)
                await trio.sleep(0.05)
        assert store.evicted == 1
        nursery.cancel_scope.cancel()


async def test_inputs_beyond_the_context_are_refused_by_the_client_and_by_the_worker(
    saved: Callable[[str], Path],
) -> None:
    cluster = Cluster()
    async with trio.open_nursery() as nursery:
        await cluster.start(nursery, saved("gpt2"))  # n_positions = 32
        async with AsyncButterfly.connect(["mem://w0"], transport=cluster.net, config=FAST) as b:
            too_long = torch.zeros(1, 33, dtype=torch.int64)
            with pytest.raises(
                ApiError, match="input of 33 positions exceeds the model's context of 32"
            ):
                await b.infer(too_long)
            with pytest.raises(ApiError, match="need 34 positions; the model's context is 32"):
                await b.generate(prompt(batch=1, seq=30), max_new_tokens=5)
            # A client that checks nothing meets the same refusal at the first stage.
            b._system.coordination.input_spec = InputSpec()
            with pytest.raises(
                ApiError, match="input of 33 positions exceeds the model's context of 32"
            ):
                await b.infer(too_long)
            out = await b.generate(prompt(batch=1, seq=30), max_new_tokens=3)  # 32 positions
            assert out.shape == (1, 33)
        nursery.cancel_scope.cancel()
