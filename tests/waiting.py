"""Waiting for what a test needs to have happened, not for a fixed time.

A fixed sleep is a guess about how fast the machine is; on a loaded one the event comes
later and the test fails for nothing. These wait for the condition itself, polling, up to
a bound that only a real failure reaches.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

__all__ = ["wait_until", "wait_until_sync"]

_POLL_S = 0.01


async def wait_until(condition: Callable[[], bool], *, what: str, timeout: float = 20.0) -> None:
    """Return once ``condition()`` holds; ``AssertionError`` naming ``what`` after ``timeout`` s."""
    with trio.move_on_after(timeout):
        while not condition():  # noqa: ASYNC110 - the conditions are plain state, no event to wait on
            await trio.sleep(_POLL_S)
        return
    raise AssertionError(f"{what}: not within {timeout:g} s")


def wait_until_sync(condition: Callable[[], bool], *, what: str, timeout: float = 20.0) -> None:
    """:func:`wait_until` for a test outside trio (the blocking facade, worker processes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(_POLL_S)
