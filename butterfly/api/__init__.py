"""The HTTP gateway: the original API and an OpenAI-compatible API over one coordinator.

    python -m butterfly.api --listen 127.0.0.1:8000 --peers ws://10.0.0.5:7070 --tokenizer DIR

:func:`serve` runs it inside a trio program: hypercorn's trio worker serves the ASGI
application (:mod:`.app`) in the same trio run as the coordinator (one process, one
event loop, no thread hand-off between HTTP and the cluster).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Iterable

import trio

from .._facade import AsyncButterfly, TokenizerSource
from ..config import ButterflyConfig
from ..errors import ConfigError
from .app import Gateway

__all__ = ["Gateway", "load_api_keys", "serve"]


def load_api_keys(path: str | os.PathLike[str]) -> frozenset[str]:
    """One key per line (blank lines and ``#`` comments skipped); ``ConfigError`` for an
    unreadable or empty file."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()  # noqa: SIM115
    except OSError as exc:
        raise ConfigError(f"cannot read API key file {str(path)!r}: {exc.strerror}") from None
    keys = frozenset(k.strip() for k in lines if k.strip() and not k.strip().startswith("#"))
    if not keys:
        raise ConfigError(f"API key file {str(path)!r} holds no key")
    return keys


async def serve(
    peers: Iterable[str],
    *,
    listen: str = "127.0.0.1:8000",
    config: ButterflyConfig | None = None,
    secret: bytes | None = None,
    tokenizer: TokenizerSource = None,
    api_keys: frozenset[str] = frozenset(),
    shutdown: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[tuple[str, Gateway]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Connect to the cluster, then serve HTTP on ``listen`` until ``shutdown`` returns.

    Ready (``task_status.started((url, gateway))``) once the model is placed and the port
    listens.
    """
    import hypercorn.config
    import hypercorn.trio

    cfg = config or ButterflyConfig()
    async with AsyncButterfly.connect(
        list(peers), config=cfg, secret=secret, tokenizer=tokenizer
    ) as client:
        context = client.input_spec.max_length
        gateway = Gateway(client, cfg.gateway, api_keys=api_keys, context_length=context)
        http = hypercorn.config.Config()
        http.bind = [listen]
        http.accesslog = None
        http.errorlog = logging.getLogger("butterfly.api.http")
        # Bodies are bounded by the application (413 with a JSON error), not by hypercorn.
        http.h11_max_incomplete_size = 64 * 1024
        async with trio.open_nursery() as nursery:
            stop = trio.Event()

            async def trigger() -> None:
                await stop.wait()

            binds = await nursery.start(
                lambda task_status: hypercorn.trio.serve(
                    gateway,  # type: ignore[arg-type]
                    http,
                    shutdown_trigger=trigger,
                    task_status=task_status,
                )
            )
            task_status.started((binds[0], gateway))
            if shutdown is None:
                await trio.sleep_forever()
            await shutdown()
            stop.set()
