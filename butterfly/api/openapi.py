"""The gateway's OpenAPI 3.1 document (request schemas generated from :mod:`.schemas`) and
its docs page (self-contained: it works on a network without the internet)."""

from __future__ import annotations

import functools
import html
from typing import Any

import msgspec

from . import schemas

__all__ = ["DOCS_HTML", "openapi_document"]

_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "code": {"type": "integer"},
            },
            "required": ["type", "message"],
        }
    },
    "required": ["error"],
}

#: (method, path, summary, request schema, success status, errors it may answer)
_OPERATIONS: list[tuple[str, str, str, type | None, int, tuple[int, ...]]] = [
    (
        "get",
        "/health",
        "200 when the model is placed and its workers ready, else 503",
        None,
        200,
        (503,),
    ),
    (
        "get",
        "/metrics",
        "The coordinator's metrics in the Prometheus text format",
        None,
        200,
        (401,),
    ),
    (
        "post",
        "/v1/inference",
        "Run one input through the model's stages (the original API)",
        schemas.InferenceRequest,
        200,
        (400, 401, 413, 429, 503, 504),
    ),
    (
        "get",
        "/v1/tasks/{task_id}",
        "A task's status, and its output once completed",
        None,
        200,
        (401, 404),
    ),
    (
        "delete",
        "/v1/tasks/{task_id}",
        "Cancel a task (its work is dropped on every worker)",
        None,
        200,
        (401, 404),
    ),
    ("get", "/v1/models", "The model served (OpenAI)", None, 200, (401,)),
    (
        "post",
        "/v1/completions",
        "Text completion (OpenAI); stream: true answers server-sent events",
        schemas.CompletionRequest,
        200,
        (400, 401, 404, 413, 429, 503, 504),
    ),
    (
        "post",
        "/v1/chat/completions",
        "Chat completion with the model's chat template (OpenAI); stream: true answers server-sent events",
        schemas.ChatRequest,
        200,
        (400, 401, 404, 413, 429, 503, 504),
    ),
    (
        "post",
        "/v1/embeddings",
        "Embeddings of an encoder model (OpenAI)",
        schemas.EmbeddingRequest,
        200,
        (400, 401, 404, 413, 429, 503, 504),
    ),
]


@functools.cache
def openapi_document() -> bytes:
    types = [op[3] for op in _OPERATIONS if op[3] is not None]
    refs, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    by_type = dict(zip(types, refs, strict=True))
    components["Error"] = _ERROR
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, body, ok, failures in _OPERATIONS:
        operation: dict[str, Any] = {
            "summary": summary,
            "operationId": f"{method}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "responses": {
                str(ok): {"description": "success", "content": {"application/json": {}}},
                **{
                    str(code): {
                        "description": "error",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                        },
                    }
                    for code in failures
                },
            },
        }
        if body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": by_type[body]}},
            }
        if "{task_id}" in path:
            operation["parameters"] = [
                {"name": "task_id", "in": "path", "required": True, "schema": {"type": "integer"}}
            ]
        if path not in ("/health",):
            operation["security"] = [{"bearer": []}, {}]
        paths.setdefault(path, {})[method] = operation
    document = {
        "openapi": "3.1.0",
        "info": {"title": "Butterfly gateway", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
    return msgspec.json.encode(document)


def _docs_html() -> bytes:
    rows = "\n".join(
        f"<tr><td><code>{m.upper()}</code></td><td><code>{html.escape(p)}</code></td>"
        f"<td>{html.escape(s)}</td><td>{b.__name__ if b else ''}</td></tr>"
        for m, p, s, b, _, _ in _OPERATIONS
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Butterfly gateway</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td{{padding:.3em .8em;border-bottom:1px solid #ddd}}</style>
</head><body>
<h1>Butterfly gateway</h1>
<p>The machine-readable description is <a href="/openapi.json">/openapi.json</a>. Send
<code>Authorization: Bearer KEY</code> when the gateway was started with an API key.
Errors are JSON <code>{{"error": {{"type", "message"}}}}</code>.</p>
<table><tr><th>method</th><th>path</th><th>what it does</th><th>body</th></tr>
{rows}
</table></body></html>
""".encode()


DOCS_HTML = _docs_html()
