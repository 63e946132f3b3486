"""The coordinator side as one set of services in one nursery.

    metrics ◀── events ── partition, coordination, scheduling
    api (facade) ─▶ scheduling ─▶ coordination ─▶ transport ─▶ workers
                         ◀── Result / Error / WorkerLost (memory channel) ──┘

``run`` reports readiness once the cluster is discovered and the first placement is
assigned; ``aclose`` drains in-flight requests with a deadline, then cancels.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import numpy as np
import torch
import trio

from ._inputs import (
    InputKind,
    apply_attention_mask,
    check_input,
    check_timeout,
    from_wire,
    to_wire,
)
from .config import ButterflyConfig
from .coordination import CoordinationService, Response
from .errors import ApiError
from .generation import GenerationService, SamplingParams, check_token_ids
from .generation.completion import Completion, TextPiece, split_stop
from .metrics import MetricsService
from .metrics.http import EXPOSITION_TYPE, Routes, serve_http
from .metrics.http import Response as HttpResponse
from .partition import PartitionService
from .scheduling import InferenceTask, SchedulingService
from .text import Tokenizer
from .transport import Transport, WebsocketTransport
from .types import ClusterInfo

__all__ = ["ButterflySystem"]


class ButterflySystem:
    """Wires metrics, partition, coordination and scheduling for one coordinator."""

    def __init__(
        self,
        peers: tuple[str, ...],
        *,
        config: ButterflyConfig,
        transport: Transport | None = None,
        secret: bytes | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.config = config
        #: Text in and out (``None``: token ids only).
        self.tokenizer = tokenizer
        self.transport = transport or WebsocketTransport(config.network)
        self.metrics = MetricsService(config.metrics)
        self.partition = PartitionService(config.partition, self.metrics)
        send, receive = trio.open_memory_channel[Response](config.scheduling.max_queue_size)
        self.coordination = CoordinationService(
            peers,
            transport=self.transport,
            config=config,
            metrics=self.metrics,
            partition=self.partition,
            responses=send,
            secret=secret,
        )
        self.scheduling = SchedulingService(
            config.scheduling,
            coordination=self.coordination,
            metrics=self.metrics,
            responses=receive,
        )
        self.generation = GenerationService(self.scheduling, self.coordination, config.scheduling)
        self._stop = trio.Event()
        #: (host, port) of the /metrics server with ``metrics.listen``.
        self.metrics_address: tuple[str, int] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start every service; ready once the model is placed; runs until :meth:`aclose`."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.metrics.run)
            if self.config.metrics.listen:
                host, _, port = self.config.metrics.listen.rpartition(":")
                routes: Routes = {
                    "/metrics": lambda: (200, EXPOSITION_TYPE, self.metrics.exposition().encode()),
                    "/health": self._health,
                }
                self.metrics_address = await nursery.start(
                    serve_http, host.strip("[]"), int(port), routes
                )
            await nursery.start(self.scheduling.run)
            await nursery.start(self.generation.run)
            await nursery.start(self.coordination.run)
            task_status.started()
            await self._stop.wait()
            await self.scheduling.drain(self.config.api.drain_timeout)
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Ask :meth:`run` to drain and return."""
        self._stop.set()

    def submit(
        self, x: Any, *, priority: int = 0, timeout: float | None = None
    ) -> tuple[InferenceTask, InputKind]:
        """Validate ``x`` and queue it; returns the task and how to convert its output back."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ApiError(f"priority must be an int, got {priority!r}")
        check_timeout(timeout, "timeout")
        tensor, kind = to_wire(x)
        check_input(
            tensor, self.coordination.input_spec, max_bytes=self.config.network.max_message_size
        )
        task = self.scheduling.submit_task(
            tensor, priority=priority, timeout=timeout or self.config.api.request_timeout
        )
        return task, kind

    async def result(self, task: InferenceTask, kind: InputKind) -> Any:
        """Wait for ``task``; its output in the caller's kind and device, or its error."""
        return from_wire(await self.scheduling.wait(task), kind)

    async def infer(self, x: Any, *, timeout: float | None = None) -> Any:
        """Run ``x`` through the pipeline; returns the output in ``x``'s kind and device."""
        task, kind = self.submit(x, timeout=timeout)
        return await self.result(task, kind)

    async def infer_many(self, xs: Sequence[Any], *, timeout: float | None = None) -> list[Any]:
        """Run independent inputs concurrently (pipelined, batched when allowed); outputs in order.

        If one fails, the others are cancelled and its error is raised.
        """
        if isinstance(xs, np.ndarray | torch.Tensor) or not isinstance(xs, Sequence):
            raise ApiError(f"infer_many expects a list of inputs, got {type(xs).__name__}")
        submitted: list[tuple[InferenceTask, InputKind]] = []
        try:
            for x in xs:
                submitted.append(self.submit(x, timeout=timeout))
            return [await self.result(task, kind) for task, kind in submitted]
        finally:
            for task, _ in submitted:
                if not task.status.final:
                    self.scheduling.cancel_task(task.task_id)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """What a generation stops at unless told otherwise: the tokenizer's directory's
        EOS tokens, else those the workers read from the model's configuration."""
        if self.tokenizer is not None and self.tokenizer.eos_token_ids:
            return self.tokenizer.eos_token_ids
        return self.coordination.eos_token_ids

    def stream(
        self,
        input_ids: Any,
        *,
        timeout: float | None = None,
        attention_mask: Any = None,
        **sampling: Any,
    ) -> tuple[AsyncGenerator[np.ndarray, None], InputKind]:
        """Validate a generation request; the tokens it yields step by step, and the
        caller's kind to return them in. ``sampling`` are :class:`SamplingParams` fields;
        ``stop=None`` (or none given) is the model's EOS tokens."""
        prompt = check_token_ids(apply_attention_mask(input_ids, attention_mask))
        SamplingParams.check_names(sampling)
        if sampling.get("stop") is None:
            sampling["stop"] = self.eos_token_ids
        params = SamplingParams.check(**sampling)
        check_timeout(timeout, "timeout")
        context = self.coordination.input_spec.max_length
        if context and prompt.shape[1] + params.max_new_tokens - 1 > context:
            raise ApiError(
                f"a prompt of {prompt.shape[1]} tokens and max_new_tokens={params.max_new_tokens} "
                f"need {prompt.shape[1] + params.max_new_tokens - 1} positions; the model's "
                f"context is {context}"
            )
        kind = InputKind(
            is_torch=isinstance(input_ids, torch.Tensor),
            device=input_ids.device if isinstance(input_ids, torch.Tensor) else None,
        )
        tokens = self.generation.stream(
            prompt, params, timeout=timeout or self.config.api.request_timeout
        )
        return tokens, kind

    def complete(
        self,
        prompts: list[list[int]],
        *,
        timeout: float | None = None,
        stop: Any = None,
        continuation: bool = True,
        **sampling: Any,
    ) -> tuple[Completion, AsyncGenerator[list[TextPiece], None]]:
        """Generate text after each prompt (token ids; ``self.tokenizer`` decodes the
        answer); its rows, and what they add step by step. ``stop`` holds strings and token
        ids, besides the model's EOS tokens; ``continuation=False`` for a chat's answer (it
        does not continue the prompt's last word)."""
        if self.tokenizer is None:
            raise ApiError(
                "text generation needs the model's tokenizer: give connect() tokenizer=DIR "
                "(a directory with tokenizer.json), or pass token ids"
            )
        SamplingParams.check_names(sampling)
        strings, ids = split_stop(stop)
        stop_ids = frozenset((*self.eos_token_ids, *ids))
        params = SamplingParams.check(**sampling, stop=stop_ids)  # fail before anything starts
        completion = Completion(
            self.tokenizer,
            prompts,
            max_new_tokens=params.max_new_tokens,
            stop_strings=strings,
            stop_ids=stop_ids,
            continuation=continuation,
        )
        steps, _ = self.stream(completion.input_ids(), timeout=timeout, stop=stop_ids, **sampling)
        return completion, completion.run(steps)

    def cluster(self) -> ClusterInfo:
        return self.coordination.cluster()

    def _health(self) -> HttpResponse:
        stages = self.coordination.cluster().stages
        body: dict[str, object]
        if not stages:
            body = {"status": "unplaced", "reason": "no placement of the model yet"}
            return 503, "application/json", json.dumps(body).encode() + b"\n"
        body = {"status": "ok", "stages": len(stages)}
        return 200, "application/json", json.dumps(body).encode() + b"\n"
