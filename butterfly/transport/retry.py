"""Opening a connection with bounded retries and exponential backoff."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from ..errors import NetworkError
from .base import Connection, Transport

__all__ = ["backoff_delays", "dial"]


def backoff_delays(attempts: int, initial: float, maximum: float) -> list[float]:
    """The waits between ``attempts`` tries: ``initial``, doubling, capped at ``maximum``."""
    return [min(initial * 2**i, maximum) for i in range(max(attempts - 1, 0))]


@asynccontextmanager
async def dial(
    transport: Transport,
    address: str,
    *,
    attempts: int,
    initial_delay: float,
    max_delay: float,
) -> AsyncIterator[Connection]:
    """Connect to ``address``, retrying ``attempts`` times with exponential backoff.

    Raises :class:`NetworkError` naming the address and the last reason when every try failed.
    """
    delays = backoff_delays(attempts, initial_delay, max_delay)
    async with AsyncExitStack() as stack:
        for attempt in range(attempts):
            try:
                conn = await stack.enter_async_context(transport.connect(address))
                break
            except NetworkError as exc:
                if attempt == attempts - 1:
                    raise NetworkError(
                        f"could not reach {address} after {attempts} attempt(s): {exc}"
                    ) from exc
                await trio.sleep(delays[attempt])
        yield conn
