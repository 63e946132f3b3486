"""Turning what escapes a nursery into one ``ButterflyError`` for the caller."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio

from .errors import ButterflyError

__all__ = ["collapse", "unwrap_groups"]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


def collapse(exc: BaseException) -> BaseException:
    """The error to show the caller: the first ``ButterflyError`` inside ``exc``, else ``exc``.

    Strict exception groups wrap every error that crosses a nursery; callers of a
    library should see ``NetworkError``, not ``ExceptionGroup[ExceptionGroup[...]]``.
    The original stays reachable as ``__cause__``.
    """
    leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)]
    for leaf in leaves:
        if isinstance(leaf, ButterflyError):
            if leaf is not exc and leaf.__cause__ is None:
                leaf.__cause__ = exc
            return leaf
    if isinstance(exc, BaseExceptionGroup) and len(leaves) == 1:
        return leaves[0]
    return exc


@contextmanager
def unwrap_groups() -> Iterator[None]:
    """Re-raise a group that holds a ``ButterflyError`` as that error, so ``except NetworkError`` works."""
    try:
        yield
    except BaseExceptionGroup as group:
        error = collapse(group)
        if isinstance(error, ButterflyError):
            raise error from group
        raise
