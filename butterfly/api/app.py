"""The gateway as an ASGI application over one :class:`~butterfly.AsyncButterfly`.

    HTTP client ─▶ hypercorn (trio worker) ─▶ Gateway.__call__ ─▶ route ─▶ AsyncButterfly
                                                   │ watches http.disconnect: cancels the
                                                   │ handler (its generation ends on every worker)

Every handler runs in a nursery beside a task that waits for ``http.disconnect``: a
client that goes away cancels its request, whether it streams or waits. A streamed
response starts only once the first piece of text is known, so an error before it (a
full queue, a bad prompt) still gets its status code; an error after it is sent as an
event with OpenAI's error body. Errors are JSON ``{"error": {"type", "message"}}``.
"""

from __future__ import annotations

import base64
import collections
import hmac
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import msgspec
import numpy as np
import trio

from .. import errors
from .._facade import AsyncButterfly, AsyncTaskHandle
from ..config import GatewayConfig
from ..generation.completion import Completion, TextPiece
from ..scheduling import TaskStatus
from ..text import Tokenizer
from . import schemas
from .openapi import DOCS_HTML, openapi_document

__all__ = ["Gateway", "HttpError"]

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

JSON = b"application/json"
SSE = b"text/event-stream"


class HttpError(Exception):
    """Answered as ``status`` with OpenAI's error body."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def _error_of(exc: errors.ButterflyError) -> HttpError:
    """The status and error type a library error is answered with."""
    match exc:
        case errors.QueueFull():
            return HttpError(429, "rate_limit_error", str(exc))
        case errors.RequestTimeout():
            return HttpError(504, "timeout_error", str(exc))
        case errors.ApiError() | errors.ModelError():
            return HttpError(400, "invalid_request_error", str(exc))
        case errors.ComputeError():
            return HttpError(500, "server_error", str(exc))
    # The cluster cannot serve: lost workers, no placement, a closing client.
    return HttpError(503, "service_unavailable", str(exc))


class _Disconnected(Exception):
    """The client went away before its request was read: nothing to answer."""


class _Request:
    """One HTTP request: its scope and a bounded body."""

    def __init__(self, scope: Scope, receive: Receive, limit: int) -> None:
        self.scope = scope
        self.receive = receive
        self.limit = limit
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", [])}
        #: Set once the body has been read (or refused): later messages are disconnects.
        self.body_read = trio.Event()

    async def body(self) -> bytes:
        try:
            return await self._read_body()
        finally:
            self.body_read.set()

    async def _read_body(self) -> bytes:
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            raise HttpError(413, "invalid_request_error", self._too_large(int(declared)))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                raise HttpError(413, "invalid_request_error", self._too_large(size))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: int) -> str:
        return (
            f"the request body has {size} bytes or more; at most {self.limit} are accepted "
            "(gateway.max_body_bytes)"
        )

    async def json(self, typ: type[Any]) -> Any:
        body = await self.body()
        try:
            return msgspec.json.decode(body, type=typ)
        except msgspec.ValidationError as exc:
            raise HttpError(400, "invalid_request_error", f"invalid request: {exc}") from None
        except msgspec.DecodeError as exc:
            raise HttpError(400, "invalid_request_error", f"the body is not JSON: {exc}") from None


class _Response:
    def __init__(
        self,
        body: Any = None,
        *,
        status: int = 200,
        content_type: bytes = JSON,
        stream: AsyncIterator[bytes] | None = None,
        raw: bytes | None = None,
    ) -> None:
        self.status = status
        self.content_type = content_type
        self.stream = stream
        self.raw = raw if raw is not None else msgspec.json.encode(body) + b"\n"


def _error_body(exc: HttpError) -> dict[str, Any]:
    return {"error": {"type": exc.kind, "message": exc.message, "code": exc.status}}


def _sse(payload: Any) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


class Gateway:
    """The ASGI application; ``client`` is the coordinator it serves through."""

    def __init__(
        self,
        client: AsyncButterfly,
        config: GatewayConfig,
        *,
        api_keys: frozenset[str] = frozenset(),
        context_length: int = 0,
    ) -> None:
        self.client = client
        self.config = config
        self.api_keys = api_keys
        self.context_length = context_length
        self.model_id = config.model_id or client.cluster().model
        self.created = int(time.time())
        #: ``POST /v1/inference`` tasks: id → (handle, whether the input was nested lists).
        self.tasks: collections.OrderedDict[int, tuple[AsyncTaskHandle, bool]] = (
            collections.OrderedDict()
        )
        self._routes: dict[tuple[str, str], Callable[[_Request], Awaitable[_Response]]] = {
            ("GET", "/health"): self.health,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/openapi.json"): self.openapi,
            ("GET", "/docs"): self.docs,
            ("POST", "/v1/inference"): self.inference,
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat_completions,
            ("POST", "/v1/embeddings"): self.embeddings,
        }
        #: Served without an API key: probes, and the API's own description.
        self._open = {"/health", "/openapi.json", "/docs"}

    # -- ASGI ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets are not served
        request = _Request(scope, receive, self.config.max_body_bytes)
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                # Only after the handler has read the body: then receive() means disconnect.
                await request.body_read.wait()
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            await self._respond(request, send)
            nursery.cancel_scope.cancel()

    async def _respond(self, request: _Request, send: Send) -> None:
        try:
            response = await self._dispatch(request)
        except _Disconnected:
            return
        except HttpError as exc:
            response = _Response(_error_body(exc), status=exc.status)
        except errors.ButterflyError as exc:
            error = _error_of(exc)
            response = _Response(_error_body(error), status=error.status)
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            error = HttpError(500, "server_error", "internal error (see the gateway's log)")
            response = _Response(_error_body(error), status=500)
        headers = [(b"content-type", response.content_type)]
        if response.stream is None:
            headers.append((b"content-length", str(len(response.raw)).encode()))
        else:
            headers.append((b"cache-control", b"no-cache"))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        if response.stream is None:
            await send({"type": "http.response.body", "body": response.raw})
            return
        async with aclosing(response.stream) as chunks:  # type: ignore[type-var]
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    async def _dispatch(self, request: _Request) -> _Response:
        path = request.path.rstrip("/") or "/"
        if path not in self._open:
            self._authorize(request)
        handler = self._routes.get((request.method, path))
        if handler is not None:
            return await handler(request)
        if path.startswith("/v1/tasks/"):
            task_id = path.removeprefix("/v1/tasks/")
            if request.method == "GET":
                return await self.task_status(task_id)
            if request.method == "DELETE":
                return await self.task_cancel(task_id)
        elif request.method == "HEAD" and ("GET", path) in self._routes:
            return await self._routes["GET", path](request)
        if any(p == path for _, p in self._routes) or path.startswith("/v1/tasks/"):
            raise HttpError(
                405, "invalid_request_error", f"{request.method} is not allowed on {path}"
            )
        raise HttpError(404, "not_found_error", f"no endpoint {path} (see /docs)")

    def _authorize(self, request: _Request) -> None:
        if not self.api_keys:
            return
        header = request.headers.get("authorization", b"").decode("latin-1")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise HttpError(
                401, "authentication_error", "missing API key: send 'Authorization: Bearer KEY'"
            )
        # Constant time against every key: the comparison must not tell how much matched.
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.api_keys):
            raise HttpError(401, "authentication_error", "the API key is not valid")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- service endpoints ---------------------------------------------------------------

    async def health(self, request: _Request) -> _Response:
        info = self.client.cluster()
        if not info.stages:
            body = {"status": "unavailable", "reason": "the model is not placed on workers"}
            return _Response(body, status=503)
        down = sorted(
            {s.node_id for s in info.stages}
            - {w.node_id for w in info.workers if str(w.state) == "ready"}
        )
        if down:
            reason = f"workers {', '.join(down)} of the placement are not ready"
            return _Response({"status": "unavailable", "reason": reason}, status=503)
        return _Response({"status": "ok", "model": self.model_id, "stages": len(info.stages)})

    async def metrics(self, request: _Request) -> _Response:
        from ..metrics.http import EXPOSITION_TYPE

        return _Response(
            raw=self.client.metrics_text().encode(), content_type=EXPOSITION_TYPE.encode()
        )

    async def openapi(self, request: _Request) -> _Response:
        return _Response(raw=openapi_document())

    async def docs(self, request: _Request) -> _Response:
        return _Response(raw=DOCS_HTML, content_type=b"text/html; charset=utf-8")

    # -- the original API ----------------------------------------------------------------

    async def inference(self, request: _Request) -> _Response:
        body: schemas.InferenceRequest = await request.json(schemas.InferenceRequest)
        nested = isinstance(body.input, list)
        x = self._decode_input(body.input)
        handle = await self.client.submit(x, priority=body.priority, timeout=body.timeout)
        self._keep(handle, nested)
        if not body.wait:
            return _Response(
                {"task_id": handle.task_id, "status": str(handle.status())}, status=202
            )
        output = await handle.result()
        return _Response(
            {"task_id": handle.task_id, "status": "completed", "output": _encode(output, nested)}
        )

    def _decode_input(self, value: list[Any] | schemas.EncodedTensor) -> np.ndarray:
        if isinstance(value, list):
            expected = self.client.input_spec.dtype
            try:
                array = np.asarray(value)
            except ValueError as exc:
                raise HttpError(
                    400, "invalid_request_error", f"input must be a rectangular nested list: {exc}"
                ) from None
            if array.dtype.kind not in "biuf":
                raise HttpError(400, "invalid_request_error", "input must hold only numbers")
            if expected and np.dtype(expected).kind in "iu" and array.dtype.kind == "f":
                raise HttpError(
                    400,
                    "invalid_request_error",
                    f"the model takes {expected} input (token ids), got numbers with fractions",
                )
            if expected:
                return array.astype(expected)
            # JSON numbers: float32, the models' usual dtype, unless all are integers.
            return array.astype(np.float32) if array.dtype.kind == "f" else array
        try:
            wire = np.dtype(value.dtype).newbyteorder("<")
            data = base64.b64decode(value.data_b64, validate=True)
            return (
                np.frombuffer(data, dtype=wire).reshape(value.shape).astype(wire.newbyteorder("="))
            )
        except (TypeError, ValueError) as exc:
            raise HttpError(
                400,
                "invalid_request_error",
                f"input {{dtype: {value.dtype!r}, shape: {value.shape}}} does not decode: {exc}",
            ) from None

    def _keep(self, handle: AsyncTaskHandle, nested: bool) -> None:
        self.tasks[handle.task_id] = (handle, nested)
        while len(self.tasks) > self.config.tasks_kept:
            oldest = next(
                (i for i, (h, _) in self.tasks.items() if h.status().final), next(iter(self.tasks))
            )
            del self.tasks[oldest]

    def _task(self, task_id: str) -> tuple[AsyncTaskHandle, bool]:
        if not task_id.isdigit() or int(task_id) not in self.tasks:
            raise HttpError(404, "not_found_error", f"no task {task_id!r} (or it was forgotten)")
        return self.tasks[int(task_id)]

    async def task_status(self, task_id: str) -> _Response:
        handle, nested = self._task(task_id)
        status = handle.status()
        body: dict[str, Any] = {"task_id": handle.task_id, "status": str(status)}
        if status is TaskStatus.COMPLETED:
            body["output"] = _encode(await handle.result(), nested)
        elif status is TaskStatus.FAILED:
            try:
                await handle.result()
            except errors.ButterflyError as exc:
                error = _error_of(exc)
                body["error"] = {"type": error.kind, "message": error.message}
        return _Response(body)

    async def task_cancel(self, task_id: str) -> _Response:
        handle, _ = self._task(task_id)
        cancelled = handle.cancel()
        return _Response(
            {"task_id": handle.task_id, "cancelled": cancelled, "status": str(handle.status())}
        )

    # -- OpenAI-compatible API -----------------------------------------------------------

    async def models(self, request: _Request) -> _Response:
        model = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "butterfly",
        }
        return _Response({"object": "list", "data": [model]})

    def _check_model(self, model: str) -> None:
        if model != self.model_id:
            raise HttpError(
                404,
                "not_found_error",
                f"model {model!r} is not served here; this gateway serves {self.model_id!r}",
            )

    def _tokenizer(self) -> Tokenizer:
        tokenizer = self.client.tokenizer
        if tokenizer is None:
            raise HttpError(
                400,
                "invalid_request_error",
                "this gateway has no tokenizer (start it with --tokenizer DIR): only token-id "
                "prompts are accepted",
            )
        return tokenizer

    def _sampling(
        self,
        body: schemas.GenerationRequest,
        prompt_length: int,
        max_tokens: int | None,
    ) -> dict[str, Any]:
        if max_tokens is None:
            if not self.context_length:
                raise HttpError(
                    400,
                    "invalid_request_error",
                    "max_tokens is required: the model's context length is unknown",
                )
            max_tokens = self.context_length - prompt_length + 1
            if max_tokens < 1:
                raise HttpError(
                    400,
                    "invalid_request_error",
                    f"the prompt's {prompt_length} tokens fill the model's context of {self.context_length}",
                )
        return {
            "max_new_tokens": max_tokens,
            # OpenAI's temperature 0 is greedy decoding.
            "do_sample": body.temperature > 0,
            "temperature": body.temperature or 1.0,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "seed": body.seed,
            "stop": body.stop,
        }

    async def completions(self, request: _Request) -> _Response:
        body: schemas.CompletionRequest = await request.json(schemas.CompletionRequest)
        self._check_model(body.model)
        prompts = self._prompts(body.prompt)
        rows = [p for p in prompts for _ in range(body.n)]
        sampling = self._sampling(body, max(map(len, prompts)), body.max_tokens)
        completion, pieces = self.client.complete(rows, **sampling)
        ident = f"cmpl-{uuid.uuid4().hex}"
        echo = [self._tokenizer().decode(p) if body.echo else "" for p in rows]

        def chunk(piece: TextPiece) -> dict[str, Any]:
            return {
                "id": ident,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model_id,
                "choices": [
                    {
                        "index": piece.index,
                        "text": piece.text,
                        "logprobs": None,
                        "finish_reason": piece.finish_reason,
                    }
                ],
            }

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            first = [TextPiece(i, e) for i, e in enumerate(echo) if e]
            return await self._stream(
                completion, pieces, first, chunk, ident, "text_completion", include_usage, body.n
            )
        await _drain(pieces)
        choices = [
            {
                "index": i,
                "text": echo[i] + row.text,
                "logprobs": None,
                "finish_reason": completion.finish_reasons[i],
            }
            for i, row in enumerate(completion.rows)
        ]
        return _Response(
            {
                "id": ident,
                "object": "text_completion",
                "created": int(time.time()),
                "model": self.model_id,
                "choices": choices,
                "usage": _usage(completion, body.n),
            }
        )

    def _prompts(self, prompt: str | list[str | int | list[int]]) -> list[list[int]]:
        if isinstance(prompt, str):
            return [self._tokenizer().encode(prompt)]
        if not prompt:
            raise HttpError(400, "invalid_request_error", "prompt is empty")
        if all(isinstance(p, str) for p in prompt):
            return [self._tokenizer().encode(p) for p in prompt]  # type: ignore[arg-type]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        if all(isinstance(p, list) for p in prompt):
            return [list(p) for p in prompt]  # type: ignore[arg-type]
        raise HttpError(
            400,
            "invalid_request_error",
            "prompt must be a string, a list of strings, a list of token ids, or a list of "
            "lists of token ids (not a mixture)",
        )

    async def chat_completions(self, request: _Request) -> _Response:
        body: schemas.ChatRequest = await request.json(schemas.ChatRequest)
        self._check_model(body.model)
        messages = [{"role": m.role, "content": _content_text(m.content)} for m in body.messages]
        ids = self._tokenizer().encode_chat(messages)
        sampling = self._sampling(body, len(ids), body.max_completion_tokens or body.max_tokens)
        completion, pieces = self.client.complete([ids] * body.n, continuation=False, **sampling)
        ident = f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(piece: TextPiece) -> dict[str, Any]:
            delta = {"content": piece.text} if piece.text or not piece.finish_reason else {}
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self.model_id,
                "choices": [
                    {
                        "index": piece.index,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": piece.finish_reason,
                    }
                ],
            }

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def opening(piece: TextPiece) -> dict[str, Any]:
                out = chunk(piece)
                out["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                return out

            first = [TextPiece(i, "") for i in range(body.n)]
            return await self._stream(
                completion,
                pieces,
                first,
                chunk,
                ident,
                "chat.completion.chunk",
                include_usage,
                body.n,
                opening,
            )
        await _drain(pieces)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": row.text},
                "logprobs": None,
                "finish_reason": completion.finish_reasons[i],
            }
            for i, row in enumerate(completion.rows)
        ]
        return _Response(
            {
                "id": ident,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.model_id,
                "choices": choices,
                "usage": _usage(completion, body.n),
            }
        )

    async def _stream(
        self,
        completion: Completion,
        pieces: AsyncGenerator[list[TextPiece], None],
        first: list[TextPiece],
        chunk: Callable[[TextPiece], dict[str, Any]],
        ident: str,
        kind: str,
        include_usage: bool,
        n: int,
        opening: Callable[[TextPiece], dict[str, Any]] | None = None,
    ) -> _Response:
        """A server-sent events response; waits for the first step so that an error before
        it is answered with its status code."""
        try:
            head = await pieces.__anext__()
        except StopAsyncIteration:
            head = []
        except BaseException:
            await pieces.aclose()
            raise

        async def events() -> AsyncGenerator[bytes, None]:
            async with aclosing(pieces):
                for piece in first:
                    yield _sse((opening or chunk)(piece))
                try:
                    for piece in head:
                        yield _sse(chunk(piece))
                    async for now in pieces:
                        for piece in now:
                            yield _sse(chunk(piece))
                except errors.ButterflyError as exc:
                    yield _sse(_error_body(_error_of(exc)))
                    return
            if include_usage:
                usage = _usage(completion, n)
                yield _sse(
                    {
                        "id": ident,
                        "object": kind,
                        "created": int(time.time()),
                        "model": self.model_id,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield b"data: [DONE]\n\n"

        return _Response(content_type=SSE, stream=events(), raw=b"")

    async def embeddings(self, request: _Request) -> _Response:
        body: schemas.EmbeddingRequest = await request.json(schemas.EmbeddingRequest)
        self._check_model(body.model)
        prompts = self._prompts(body.input)
        ids = np.full((len(prompts), max(map(len, prompts))), -1, dtype=np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        output = np.asarray(await self.client.infer(ids), dtype=np.float32)
        if output.ndim == 3:
            tokenizer = self.client.tokenizer
            if tokenizer is not None and output.shape[-1] == tokenizer.vocab_size:
                raise HttpError(
                    400,
                    "invalid_request_error",
                    f"model {self.model_id!r} is a decoder (its output is logits over the vocabulary): embeddings need an encoder model",
                )
            mask = (ids >= 0)[..., None]
            output = (output * mask).sum(axis=1) / mask.sum(axis=1)  # mean over the tokens
        if output.ndim != 2:
            raise HttpError(
                400,
                "invalid_request_error",
                f"model {self.model_id!r} gives outputs of shape {output.shape}; embeddings need (batch, dim) or (batch, seq, dim)",
            )
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()
                if body.encoding_format == "base64"
                else row.tolist(),
            }
            for i, row in enumerate(output)
        ]
        tokens = sum(map(len, prompts))
        return _Response(
            {
                "object": "list",
                "data": data,
                "model": self.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


async def _drain(pieces: AsyncGenerator[list[TextPiece], None]) -> None:
    async with aclosing(pieces):
        async for _ in pieces:
            pass


def _usage(completion: Completion, n: int) -> dict[str, int]:
    # The rows are each prompt n times: the caller sent each prompt once (OpenAI counts so).
    prompt_tokens = completion.prompt_tokens // n
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": prompt_tokens + completion.completion_tokens,
    }


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise HttpError(
                400,
                "invalid_request_error",
                f"only text content parts are supported, got {part.get('type')!r}",
            )
        parts.append(part["text"])
    return "".join(parts)


def _encode(output: Any, nested: bool) -> Any:
    array = np.asarray(output)
    if nested:
        return array.tolist()
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "data_b64": base64.b64encode(
            np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        ).decode(),
    }
