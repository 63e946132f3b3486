"""Websocket transport on trio-websocket, sized for tensors.

trio-websocket's defaults (1 MiB messages, 4 KiB reads) close a connection on the
first real activation, so both come from :class:`~butterfly.config.NetworkConfig`.

Direction matters: RFC 6455 makes a client mask every frame it sends, and wsproto
masks in pure Python (≈5× slower than the server→client direction). Callers that
move bulk tensors therefore send them on connections they *accepted*; see
``butterfly.worker`` for how stage links are dialled by the receiving side.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import trio
import trio_websocket

from ..config import NetworkConfig
from ..errors import NetworkError, ProtocolError
from .base import Connection, ConnectionHandler

__all__ = ["WebsocketConnection", "WebsocketTransport", "parse_address"]

log = logging.getLogger(__name__)


def parse_address(address: str) -> tuple[str, int]:
    """Split ``ws://host:port`` (or ``host:port``) into host and port; raises ``NetworkError``."""
    text = address if "://" in address else f"ws://{address}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise NetworkError(f"invalid address {address!r}: {exc}; expected ws://HOST:PORT") from exc
    if parts.scheme != "ws" or not parts.hostname or port is None:
        raise NetworkError(f"invalid address {address!r}; expected ws://HOST:PORT")
    return parts.hostname, port


def _format(host: str, port: int) -> str:
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


class WebsocketConnection:
    """A :class:`Connection` over one trio-websocket connection."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, remote: str) -> None:
        self._ws = ws
        self._remote = remote

    @property
    def remote(self) -> str:
        return self._remote

    async def send(self, frame: bytes) -> None:
        try:
            await self._ws.send_message(frame)
        except trio_websocket.ConnectionClosed as exc:
            raise NetworkError(f"connection to {self._remote} closed: {exc.reason}") from exc

    async def receive(self) -> bytes:
        try:
            message = await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise NetworkError(f"connection to {self._remote} closed: {exc.reason}") from exc
        if isinstance(message, str):
            raise ProtocolError(
                f"{self._remote} sent a text frame; only binary frames are accepted"
            )
        return message

    async def aclose(self) -> None:
        await self._ws.aclose()


class WebsocketTransport:
    """Implements the :class:`Transport` interface over websockets."""

    def __init__(self, config: NetworkConfig | None = None) -> None:
        self.config = config or NetworkConfig()

    def validate_address(self, address: str) -> None:
        parse_address(address)

    @asynccontextmanager
    async def connect(self, address: str) -> AsyncIterator[Connection]:
        host, port = parse_address(address)
        url = _format(host, port)
        opened = False
        try:
            async with trio_websocket.open_websocket(
                host,
                port,
                "/",
                use_ssl=False,
                max_message_size=self.config.max_message_size,
                receive_buffer_size=self.config.receive_buffer_size,
                message_queue_size=self.config.send_queue_size,
                connect_timeout=self.config.connect_timeout,
                disconnect_timeout=2,
            ) as ws:
                opened = True
                yield WebsocketConnection(ws, url)
        except (OSError, trio_websocket.HandshakeError, trio.TooSlowError) as exc:
            if opened:
                raise
            reason = str(exc) or str(exc.__cause__ or "") or type(exc).__name__
            raise NetworkError(f"cannot connect to {url}: {reason}") from exc

    async def serve(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        host, port = parse_address(address)

        async def on_request(request: trio_websocket.WebSocketRequest) -> None:
            ws = await request.accept()
            remote = request.remote
            if isinstance(remote, trio_websocket.Endpoint):
                peer = f"{remote.address}:{remote.port}"
            else:
                peer = str(remote)
            try:
                await handler(WebsocketConnection(ws, f"ws://{peer}"))
            except Exception as exc:
                # One bad peer (or one handler bug) must never take the server down.
                log.info("connection from %s ended: %r", peer, exc)
            finally:
                await ws.aclose()

        try:
            listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as exc:
            raise NetworkError(f"cannot listen on {_format(host, port)}: {exc.strerror}") from exc
        server = trio_websocket.WebSocketServer(
            on_request,
            listeners,
            max_message_size=self.config.max_message_size,
            receive_buffer_size=self.config.receive_buffer_size,
            message_queue_size=self.config.send_queue_size,
            connect_timeout=self.config.connect_timeout,
            disconnect_timeout=2,
        )
        bound_port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            task_status.started(_format(host, bound_port))
