"""The public entry points: :class:`Butterfly` (blocking) and :class:`AsyncButterfly` (trio)."""

from __future__ import annotations

import concurrent.futures
import functools
import os
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing, asynccontextmanager, closing
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import trio

from ._errors import collapse
from ._inputs import InputKind, apply_attention_mask, check_timeout, from_wire, tokens_as
from ._local import LocalCluster
from ._portal import Portal, refuse_inside_trio
from .config import ButterflyConfig, load_config
from .credentials import generate_secret, load_secret
from .errors import ApiError, ButterflyError, RequestTimeout
from .generation import check_token_ids
from .generation.completion import Completion, TextPiece
from .metrics import Event, MetricsSnapshot
from .model.gguf_file import GGUFFile
from .protocol import InputSpec
from .scheduling import InferenceTask, TaskStatus
from .system import ButterflySystem
from .text import Message, Tokenizer
from .transport import Transport, WebsocketTransport
from .types import ClusterInfo

__all__ = ["AsyncButterfly", "AsyncTaskHandle", "Butterfly", "TaskHandle"]

T = TypeVar("T")

ConfigSource = ButterflyConfig | str | os.PathLike[str] | dict[str, Any] | None
TokenizerSource = Tokenizer | str | os.PathLike[str] | None


def load_tokenizer(source: TokenizerSource) -> Tokenizer | None:
    if source is None or isinstance(source, Tokenizer):
        return source
    if not isinstance(source, str | os.PathLike):
        raise ApiError(
            "tokenizer must be a model directory (with tokenizer.json), a .gguf file or a "
            f"Tokenizer, got {source!r}"
        )
    return Tokenizer.load(source)


def _model_directory_tokenizer(model: object) -> Tokenizer | None:
    """An ``hf:DIR`` model's own tokenizer, when ``DIR`` has one; a ``gguf:FILE`` model's,
    when the file carries one."""
    if isinstance(model, str) and model.startswith("hf:"):
        directory = Path(model.removeprefix("hf:")).expanduser()
        if (directory / "tokenizer.json").is_file():
            return Tokenizer.from_directory(directory)
    if isinstance(model, str) and model.startswith("gguf:"):
        file = Path(model.removeprefix("gguf:")).expanduser()
        if file.is_file():
            gguf = GGUFFile(file, vocabulary=True)
            return Tokenizer.from_gguf_file(gguf) if gguf.has("tokenizer.ggml.model") else None
    return None


def _tokenizer_of(system: ButterflySystem, what: str) -> Tokenizer:
    if system.tokenizer is None:
        raise ApiError(
            f"{what} needs the model's tokenizer: connect with tokenizer=DIR (a directory "
            "with tokenizer.json), or pass token ids"
        )
    return system.tokenizer


def _stream_prompt(system: ButterflySystem, prompt: str | Sequence[Message]) -> list[int]:
    """The token ids of ``stream()``'s one text prompt or chat."""
    if _is_chat(prompt):
        return _tokenizer_of(system, "chat").encode_chat(prompt)  # type: ignore[arg-type]
    if not isinstance(prompt, str):
        raise ApiError("stream() takes one text prompt; generate() takes a list of them")
    return _tokenizer_of(system, "a text prompt").encode(prompt)


def _is_text(prompt: object) -> bool:
    return isinstance(prompt, str) or (
        isinstance(prompt, list) and bool(prompt) and all(isinstance(p, str) for p in prompt)
    )


def _is_chat(prompt: object) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, Mapping) for m in prompt)


def _check_peers(peers: Iterable[str] | str, transport: Transport) -> tuple[str, ...]:
    if isinstance(peers, str):
        peers = [peers]
    try:
        result = tuple(peers)
    except TypeError:
        raise ApiError(
            f"peers must be a list of 'ws://HOST:PORT' addresses, got {peers!r}"
        ) from None
    if not result:
        raise ApiError(
            "peers is empty: give at least one worker address, e.g. ['ws://10.0.0.5:7070']"
        )
    for peer in result:
        if not isinstance(peer, str):
            raise ApiError(f"peer {peer!r} is not a string; expected 'ws://HOST:PORT'")
        try:
            transport.validate_address(peer)
        except ButterflyError as exc:
            raise ApiError(str(exc)) from None
    return result


class Butterfly:
    """A blocking client of a Butterfly cluster; safe to share between threads.

    >>> with Butterfly.connect(["ws://10.0.0.5:7070"]) as b:
    ...     y = b.infer(x)
    """

    def __init__(
        self, portal: Portal, system: ButterflySystem, *, on_close: Callable[[], None] | None = None
    ) -> None:
        self._portal = portal
        self._system = system
        self._on_close = on_close
        self._closed = False

    @classmethod
    def connect(
        cls,
        peers: Iterable[str] | str,
        *,
        config: ConfigSource = None,
        timeout: float | None = None,
        transport: Transport | None = None,
        secret: str | bytes | None = None,
        tokenizer: TokenizerSource = None,
    ) -> Butterfly:
        """Discover the cluster from ``peers``, place the model, and return a ready client.

        ``secret`` is the cluster's shared secret (default: the file ``network.secret_file``
        names, else the ``BUTTERFLY_SECRET`` environment variable, else none).
        ``tokenizer`` (a model directory with ``tokenizer.json``, or a
        :class:`~butterfly.text.Tokenizer`) enables text in and out: ``generate("...")``,
        ``chat(messages)``.

        Raises ``NetworkError`` naming the addresses tried when no worker answers,
        ``AuthenticationError`` when none accepts this client's secret (or lack of one), and
        ``FingerprintMismatch`` when the workers hold different weights.
        """
        refuse_inside_trio("Butterfly.connect")
        cfg = load_config(config)
        key = load_secret(secret, secret_file=cfg.network.secret_file)
        transport = transport or WebsocketTransport(cfg.network)
        seeds = _check_peers(peers, transport)
        check_timeout(timeout, "timeout")
        system = ButterflySystem(
            seeds, config=cfg, transport=transport, secret=key, tokenizer=load_tokenizer(tokenizer)
        )
        portal = Portal()
        portal.start(system.run, timeout=timeout or cfg.api.connect_timeout)
        return cls(portal, system)

    @classmethod
    def local(
        cls,
        model: str | Callable[..., Any],
        workers: int = 3,
        *,
        config: ConfigSource = None,
        timeout: float | None = None,
        **worker_options: Any,
    ) -> Butterfly:
        """Start ``workers`` local worker processes serving ``model`` and connect to them.

        ``worker_options`` are those of :class:`~butterfly._local.LocalCluster`
        (``weights``, ``threads``, ``device``). The processes stop when the client closes.
        They and this client share a random secret made for them (unless ``secret`` is
        among ``worker_options``): nothing else on the machine can use the workers. An
        ``hf:DIR`` model whose directory has ``tokenizer.json`` brings its tokenizer along.
        """
        refuse_inside_trio("Butterfly.local")
        secret = worker_options.pop("secret", None) or generate_secret()
        tokenizer = worker_options.pop("tokenizer", None) or _model_directory_tokenizer(model)
        cluster = LocalCluster(model, workers, secret=secret, **worker_options)
        try:
            client = cls.connect(
                cluster.addresses,
                config=config,
                timeout=timeout,
                secret=secret,
                tokenizer=tokenizer,
            )
        except BaseException:
            cluster.close()
            raise
        client._on_close = cluster.close
        client.local_cluster = cluster
        return client

    local_cluster: LocalCluster | None = None

    @property
    def tokenizer(self) -> Tokenizer | None:
        """The model's tokenizer when text in and out is enabled (see :meth:`connect`)."""
        return self._system.tokenizer

    def infer(self, x: Any, *, attention_mask: Any = None, timeout: float | None = None) -> Any:
        """Run ``x`` (numpy array or torch tensor, batch first) through the model's stages.

        Returns the output as the same kind, dtype and device that a local forward gives.
        ``attention_mask`` (token-id inputs: the mask a tokenizer returns) marks padding,
        as negative ids do.
        """
        refuse_inside_trio("Butterfly.infer")
        check_timeout(timeout, "timeout")
        x = apply_attention_mask(x, attention_mask)
        return self._portal.call(functools.partial(self._system.infer, timeout=timeout), x)

    def submit(self, x: Any, *, priority: int = 0, timeout: float | None = None) -> TaskHandle:
        """Queue ``x`` and return at once; ``handle.result()`` waits for the output.

        ``priority`` matters with ``scheduling.scheduler_type = "priority"`` (higher first).
        ``timeout`` (seconds, default ``api.request_timeout``) covers queueing and compute.
        Raises ``SchedulingError`` at once when ``scheduling.max_queue_size`` tasks are pending.
        """
        refuse_inside_trio("Butterfly.submit")
        future: concurrent.futures.Future[InferenceTask] = concurrent.futures.Future()

        async def submit() -> tuple[InferenceTask, InputKind]:
            task, kind = self._system.submit(x, priority=priority, timeout=timeout)
            # Runs in the trio thread when the task finishes; Future is thread-safe.
            task.on_done.append(future.set_result)
            return task, kind

        task, kind = self._portal.call(submit)
        return TaskHandle(self, task.task_id, kind, future)

    def infer_many(self, xs: Sequence[Any], *, timeout: float | None = None) -> list[Any]:
        """Run a list of independent inputs through the pipeline concurrently; outputs in order.

        If one fails, the others are cancelled and its error is raised.
        """
        refuse_inside_trio("Butterfly.infer_many")
        check_timeout(timeout, "timeout")
        return self._portal.call(functools.partial(self._system.infer_many, timeout=timeout), xs)

    def generate(
        self,
        prompt: Any,
        *,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Any = None,
        attention_mask: Any = None,
        timeout: float | None = None,
    ) -> Any:
        """Generate up to ``max_new_tokens`` tokens after ``prompt`` with a decoder model.

        ``prompt`` is ``(batch, seq)`` token ids (negative ids, or zeros of
        ``attention_mask``, pad rows shorter than others): returns ``(batch, seq + n)``
        token ids in the prompt's kind, the prompt as given. Or it is text (a ``str``, or a
        list of them; needs the tokenizer): returns the generated text (a ``str``, or a
        list). Greedy unless ``do_sample``; ``seed`` makes sampling reproducible. Rows end
        at a ``stop`` token id (default: the model's EOS tokens, as ``transformers``; then
        they repeat it) and, for text, at a ``stop`` string (not included). ``timeout``
        bounds each step. Each stage keeps the session's KV cache, so a step sends one token.
        """
        sampling = {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "seed": seed,
            "stop": stop,
        }
        if _is_text(prompt):
            return self._complete(self._encode(prompt, attention_mask), timeout, sampling, prompt)
        steps, kind = self._steps(prompt, timeout, sampling, attention_mask)
        parts = [check_token_ids(prompt), *(step[:, None] for step in steps)]
        return tokens_as(np.concatenate(parts, axis=1), kind)

    def chat(
        self,
        messages: Sequence[Message],
        *,
        max_new_tokens: int,
        timeout: float | None = None,
        **sampling: Any,
    ) -> str:
        """The assistant's answer to ``messages`` (``[{"role": "user", "content": ...}]``),
        the prompt made by the model's chat template; ``sampling`` as :meth:`generate`'s."""
        ids = _tokenizer_of(self._system, "chat").encode_chat(messages)
        sampling.update(max_new_tokens=max_new_tokens, continuation=False)
        answer: str = self._complete([ids], timeout, sampling, "")
        return answer

    def stream(
        self, prompt: Any, *, timeout: float | None = None, **sampling: Any
    ) -> Iterator[Any]:
        """Like :meth:`generate`, but yield as the tokens come: each step's ``(batch,)`` token
        ids for token ids, text pieces for a ``str`` prompt or a chat (a list of messages).

        Closing the iterator early ends the session (its caches are freed on the workers).
        """
        attention_mask = sampling.pop("attention_mask", None)
        if _is_text(prompt) or _is_chat(prompt):
            ids = _stream_prompt(self._system, prompt)
            start = functools.partial(
                self._system.complete,
                [ids],
                timeout=timeout,
                continuation=not _is_chat(prompt),
                **sampling,
            )
            _, pieces = self._portal.call(_sync_to_async(start))
            with closing(self._pull(pieces)) as texts:
                for pieces_now in texts:
                    yield "".join(piece.text for piece in pieces_now)
            return
        tokens, kind = self._steps(prompt, timeout, sampling, attention_mask)
        with closing(tokens):
            for step in tokens:
                yield tokens_as(step, kind)

    def _encode(self, prompt: str | list[str], attention_mask: Any) -> list[list[int]]:
        if attention_mask is not None:
            raise ApiError("attention_mask goes with token ids, not with text prompts")
        tokenizer = _tokenizer_of(self._system, "a text prompt")
        return [tokenizer.encode(p) for p in ([prompt] if isinstance(prompt, str) else prompt)]

    def _complete(
        self, prompts: list[list[int]], timeout: float | None, sampling: dict[str, Any], given: Any
    ) -> Any:
        """Run a text generation to its end; the text of each row (one ``str`` unless
        ``given`` was a list)."""
        refuse_inside_trio("Butterfly.generate")
        start = functools.partial(self._system.complete, prompts, timeout=timeout, **sampling)
        completion, pieces = self._portal.call(_sync_to_async(start))
        with closing(self._pull(pieces)) as steps:
            for _ in steps:
                pass
        texts = [row.text for row in completion.rows]
        return texts if isinstance(given, list) else texts[0]

    def _pull(self, items: AsyncGenerator[T, None]) -> Generator[T, None, None]:
        """An async generator of the trio thread, pulled one blocking call at a time."""
        try:
            while True:
                try:
                    yield self._portal.call(items.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            self._portal.call(items.aclose)

    def _steps(
        self, input_ids: Any, timeout: float | None, sampling: dict[str, Any], attention_mask: Any
    ) -> tuple[Generator[np.ndarray, None, None], InputKind]:
        """Start a generation in the trio thread; its steps, pulled one call at a time."""
        refuse_inside_trio("Butterfly.generate")
        start = functools.partial(
            self._system.stream,
            input_ids,
            timeout=timeout,
            attention_mask=attention_mask,
            **sampling,
        )
        tokens, kind = self._portal.call(_sync_to_async(start))
        return self._pull(tokens), kind

    def cluster(self) -> ClusterInfo:
        """The workers (id, address, state) and the current placement."""
        return self._portal.call(_sync_to_async(self._system.cluster))

    def release(self, node_id: str) -> None:
        """Let a quarantined worker (one caught contradicting its replicas' quorum under
        ``coordination.verification``) be placed again; ``ApiError`` if it is not quarantined."""
        self._portal.call(_sync_to_async(lambda: self._system.coordination.release(node_id)))

    def metrics(self) -> MetricsSnapshot:
        """A snapshot of the coordinator's metrics (request counts, latency percentiles,
        where the time went per stage and link)."""
        return self._portal.call(_sync_to_async(self._system.metrics.snapshot))

    def metrics_text(self) -> str:
        """Every metric in the Prometheus text format (what a ``/metrics`` endpoint serves)."""
        return self._portal.call(_sync_to_async(self._system.metrics.exposition))

    def trace(self, task_id: int) -> list[Event]:
        """Task ``task_id``'s events in order: submitted, queued, dispatched, each stage's
        compute and each hop, completed (the most recent ``metrics.trace_tasks`` tasks)."""
        _check_task_id(task_id)
        return self._portal.call(_sync_to_async(lambda: self._system.metrics.trace(task_id)))

    def close(self) -> None:
        """Drain in-flight requests (``api.drain_timeout``), stop, and join the background thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._portal.run_sync_soon(self._system.stop)
            self._portal.join(self._system.config.api.drain_timeout + 10)
        finally:
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> Butterfly:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class TaskHandle:
    """A submitted request. Thread-safe; ``result`` may be called from any thread."""

    def __init__(
        self,
        client: Butterfly,
        task_id: int,
        kind: InputKind,
        future: concurrent.futures.Future[InferenceTask],
    ) -> None:
        self.task_id = task_id
        self._client = client
        self._kind = kind
        self._future = future

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the output (in the input's kind and device) or raise the task's error.

        ``timeout`` bounds this wait only: on expiry ``RequestTimeout`` is raised and the
        task keeps running (``cancel()`` it if its answer is no longer wanted).
        """
        check_timeout(timeout, "timeout")
        try:
            task = self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise RequestTimeout(
                f"task {self.task_id} has not finished within {timeout:g} s; it is still "
                f"{self.status()} (cancel() it if its answer is no longer wanted)"
            ) from None
        if task.result is None:
            assert task.error is not None
            raise task.error
        return from_wire(task.result, self._kind)

    def done(self) -> bool:
        return self._future.done()

    def status(self) -> TaskStatus:
        """Pending, Queued, Running, Completed, Failed or Cancelled."""
        scheduling = self._client._system.scheduling
        return self._client._portal.call(
            _sync_to_async(lambda: scheduling.query_status(self.task_id))
        )

    def cancel(self) -> bool:
        """Cancel the task if it is queued or running (its work is dropped on every worker).

        Returns ``False`` if it had already finished.
        """
        scheduling = self._client._system.scheduling
        return self._client._portal.call(
            _sync_to_async(lambda: scheduling.cancel_task(self.task_id))
        )

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} {'done' if self.done() else 'pending'}>"


def _sync_to_async(fn: Callable[[], T]) -> Callable[[], Awaitable[T]]:
    async def call() -> T:
        return fn()

    return call


class AsyncButterfly:
    """The same client for trio programs.

    >>> async with AsyncButterfly.connect(["ws://10.0.0.5:7070"]) as b:
    ...     y = await b.infer(x)
    """

    def __init__(self, system: ButterflySystem) -> None:
        self._system = system

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        peers: Iterable[str] | str,
        *,
        config: ConfigSource = None,
        timeout: float | None = None,
        transport: Transport | None = None,
        secret: str | bytes | None = None,
        tokenizer: TokenizerSource = None,
    ) -> AsyncIterator[AsyncButterfly]:
        """See :meth:`Butterfly.connect`."""
        cfg = load_config(config)
        key = load_secret(secret, secret_file=cfg.network.secret_file)
        transport = transport or WebsocketTransport(cfg.network)
        seeds = _check_peers(peers, transport)
        check_timeout(timeout, "timeout")
        system = ButterflySystem(
            seeds, config=cfg, transport=transport, secret=key, tokenizer=load_tokenizer(tokenizer)
        )
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(timeout or cfg.api.connect_timeout):
                        await nursery.start(system.run)
                except trio.TooSlowError:
                    from .errors import NetworkError

                    raise NetworkError(
                        f"the cluster was not ready within {timeout or cfg.api.connect_timeout:g} s"
                    ) from None
                try:
                    yield cls(system)
                finally:
                    system.stop()
        except BaseExceptionGroup as group:
            raise collapse(group) from group

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._system.tokenizer

    @property
    def input_spec(self) -> InputSpec:
        """What the model's first layer accepts (dtype, dimensions, longest sequence)."""
        return self._system.coordination.input_spec

    async def infer(
        self, x: Any, *, attention_mask: Any = None, timeout: float | None = None
    ) -> Any:
        """See :meth:`Butterfly.infer`."""
        return await self._system.infer(apply_attention_mask(x, attention_mask), timeout=timeout)

    async def submit(
        self, x: Any, *, priority: int = 0, timeout: float | None = None
    ) -> AsyncTaskHandle:
        task, kind = self._system.submit(x, priority=priority, timeout=timeout)
        return AsyncTaskHandle(self._system, task, kind)

    async def infer_many(self, xs: Sequence[Any], *, timeout: float | None = None) -> list[Any]:
        return await self._system.infer_many(xs, timeout=timeout)

    async def generate(
        self,
        prompt: Any,
        *,
        timeout: float | None = None,
        attention_mask: Any = None,
        **sampling: Any,
    ) -> Any:
        """See :meth:`Butterfly.generate`."""
        if _is_text(prompt):
            if attention_mask is not None:
                raise ApiError("attention_mask goes with token ids, not with text prompts")
            tokenizer = _tokenizer_of(self._system, "a text prompt")
            prompts = [
                tokenizer.encode(p) for p in ([prompt] if isinstance(prompt, str) else prompt)
            ]
            completion, pieces = self._system.complete(prompts, timeout=timeout, **sampling)
            async with aclosing(pieces):
                async for _ in pieces:
                    pass
            texts = [row.text for row in completion.rows]
            return texts if isinstance(prompt, list) else texts[0]
        tokens, kind = self._system.stream(
            prompt, timeout=timeout, attention_mask=attention_mask, **sampling
        )
        parts = [check_token_ids(prompt)]
        async with aclosing(tokens):
            async for step in tokens:
                parts.append(step[:, None])
        return tokens_as(np.concatenate(parts, axis=1), kind)

    async def chat(
        self, messages: Sequence[Message], *, timeout: float | None = None, **sampling: Any
    ) -> str:
        """See :meth:`Butterfly.chat`."""
        ids = _tokenizer_of(self._system, "chat").encode_chat(messages)
        completion, pieces = self._system.complete(
            [ids], timeout=timeout, continuation=False, **sampling
        )
        async with aclosing(pieces):
            async for _ in pieces:
                pass
        return completion.rows[0].text

    async def stream(
        self, prompt: Any, *, timeout: float | None = None, **sampling: Any
    ) -> AsyncIterator[Any]:
        """See :meth:`Butterfly.stream`."""
        attention_mask = sampling.pop("attention_mask", None)
        if _is_text(prompt) or _is_chat(prompt):
            ids = _stream_prompt(self._system, prompt)
            _, pieces = self._system.complete(
                [ids], timeout=timeout, continuation=not _is_chat(prompt), **sampling
            )
            async with aclosing(pieces):
                async for now in pieces:
                    yield "".join(piece.text for piece in now)
            return
        tokens, kind = self._system.stream(
            prompt, timeout=timeout, attention_mask=attention_mask, **sampling
        )
        async with aclosing(tokens):
            async for step in tokens:
                yield tokens_as(step, kind)

    def complete(
        self, prompts: list[list[int]], *, timeout: float | None = None, **sampling: Any
    ) -> tuple[Completion, AsyncGenerator[list[TextPiece], None]]:
        """Text generation at its lowest level (what the HTTP gateway serves): each prompt's
        token ids in; the rows (text so far, finish reasons, token counts) and an async
        generator of what each step adds. ``sampling`` as :meth:`Butterfly.generate`'s, its
        ``stop`` holding strings and token ids."""
        return self._system.complete(prompts, timeout=timeout, **sampling)

    def cluster(self) -> ClusterInfo:
        return self._system.cluster()

    def release(self, node_id: str) -> None:
        """See :meth:`Butterfly.release`."""
        self._system.coordination.release(node_id)

    def metrics(self) -> MetricsSnapshot:
        return self._system.metrics.snapshot()

    def metrics_text(self) -> str:
        return self._system.metrics.exposition()

    def trace(self, task_id: int) -> list[Event]:
        _check_task_id(task_id)
        return self._system.metrics.trace(task_id)


class AsyncTaskHandle:
    """A submitted request, for trio programs."""

    def __init__(self, system: ButterflySystem, task: InferenceTask, kind: InputKind) -> None:
        self.task_id = task.task_id
        self._system = system
        self._task = task
        self._kind = kind

    async def result(self) -> Any:
        """Wait for the output or raise the task's error. Cancelling this wait cancels the task."""
        return await self._system.result(self._task, self._kind)

    def status(self) -> TaskStatus:
        return self._task.status

    def cancel(self) -> bool:
        return self._system.scheduling.cancel_task(self.task_id)


def _check_task_id(task_id: object) -> None:
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 1:
        raise ApiError(f"task_id must be a positive int (a handle's task_id), got {task_id!r}")
