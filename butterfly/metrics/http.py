"""A tiny read-only HTTP/1.1 server for ``/metrics`` and ``/health`` (h11 on trio).

It answers ``GET`` (and ``HEAD``) of the paths it is given and nothing else: no upgrade,
no request body, one request per connection at most ``_MAX_REQUEST`` bytes, each within
``_TIMEOUT_S``. That is all a Prometheus scraper or a load balancer's health check needs,
and a surface this small is easy to keep safe on a worker's network (the HTTP gateway
of the API is a different, full ASGI server).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import h11
import trio

from ..errors import NetworkError

__all__ = ["EXPOSITION_TYPE", "Response", "Routes", "serve_http"]

log = logging.getLogger(__name__)

#: (status, content type, body)
Response = tuple[int, str, bytes]
Routes = dict[str, Callable[[], Response]]

#: The content type of the Prometheus text format.
EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_MAX_REQUEST = 16 * 1024
_TIMEOUT_S = 10.0
_MAX_CONNECTIONS = 64


async def serve_http(
    host: str,
    port: int,
    routes: Routes,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` (path → handler) on ``host:port`` until cancelled; reports the
    bound ``(host, port)``."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise NetworkError(f"cannot listen on {host}:{port} for metrics: {exc.strerror}") from exc
    bound = listeners[0].socket.getsockname()
    open_connections = 0

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal open_connections
        if open_connections >= _MAX_CONNECTIONS:
            await trio.aclose_forcefully(stream)
            return
        open_connections += 1
        try:
            with trio.move_on_after(_TIMEOUT_S):
                await _answer(stream, routes)
        except (trio.BrokenResourceError, OSError, h11.ProtocolError) as exc:
            log.debug("metrics request failed: %r", exc)
        finally:
            open_connections -= 1
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started((str(bound[0]), int(bound[1])))


async def _answer(stream: trio.SocketStream, routes: Routes) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            if not data and conn.their_state is not h11.DONE:
                return
            continue
        break
    if not isinstance(event, h11.Request):
        return
    method, target = event.method.decode(), event.target.decode()
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        status, content_type, body = 405, "text/plain", b"only GET and HEAD\n"
    elif path not in routes:
        status, content_type, body = 404, "text/plain", f"{path} not found\n".encode()
    else:
        status, content_type, body = routes[path]()
    headers = [
        ("content-type", content_type),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    if status == 405:
        headers.append(("allow", "GET, HEAD"))
    out = conn.send(h11.Response(status_code=status, headers=headers)) or b""
    if method != "HEAD":
        out += conn.send(h11.Data(data=body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(out)
