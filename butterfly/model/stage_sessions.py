"""The stages' half of a generation session: state a stage keeps between its steps (KV caches).

A step of a session runs a stage's layers inside :func:`stepping`, which makes its
:class:`Step` visible to the layers through a context variable: layers that cache (the
decoder blocks of :mod:`.hf_layers`) keep their keys and values in ``step.state`` and take
``step.position`` as the position of the step's first token. Layers that do not know
about sessions ignore it, so any model runs in a session (without a cache, slowly).

A worker's :class:`SessionStore` bounds that state: least recently used sessions are
dropped beyond ``generation.kv_cache_bytes``, idle ones after ``session_idle_s``, and a
session's state is freed when its coordinator ends it. A dropped cache costs a replay:
the next step finds no cache at its position and its coordinator sends all the
session's tokens again.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs

from ..config import GenerationConfig
from ..errors import CoordinationError

__all__ = ["SessionKey", "SessionStore", "Step", "current_step", "stepping"]

#: (coordinator, session id, placement epoch, first layer of the stage)
SessionKey = tuple[str, int, int, int]


@attrs.define(eq=False)
class Step:
    """One step of a session through one stage."""

    #: Index of the step's first token in the session's sequence.
    position: int
    #: What the stage's layers keep between steps, by their own keys.
    state: dict[str, Any]

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Keep only these rows of the session's state, in this order (see ``Activation.keep``)."""
        for value in self.state.values():
            keep = getattr(value, "keep_rows", None)
            if keep is not None:
                keep(rows)


_current: contextvars.ContextVar[Step | None] = contextvars.ContextVar(
    "butterfly_step", default=None
)


def current_step() -> Step | None:
    """The session step being computed, or ``None`` outside a session."""
    return _current.get()


@contextlib.contextmanager
def stepping(step: Step) -> Iterator[Step]:
    token = _current.set(step)
    try:
        yield step
    finally:
        _current.reset(token)


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes of the tensors in ``state``: plain tensors, and objects that count their own
    (``nbytes``, as :class:`~butterfly.model.blocks.KVCache` does)."""
    total = 0
    for value in state.values():
        nbytes = getattr(value, "nbytes", 0)
        total += nbytes if isinstance(nbytes, int) else 0
    return total


@attrs.define(eq=False)
class _Entry:
    state: dict[str, Any] = attrs.field(factory=dict)
    #: Tokens the state covers.
    length: int = 0
    nbytes: int = 0
    used_at: float = 0.0


class SessionStore:
    """Per session and stage, the state its layers keep; bounded in bytes and idle time.

    Called from the worker's compute threads and from its event loop: every method
    takes the store's lock.
    """

    def __init__(
        self, *, max_bytes: int, idle_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self._clock = clock
        self._entries: collections.OrderedDict[SessionKey, _Entry] = collections.OrderedDict()
        self._lock = threading.Lock()
        #: Sessions dropped for room or idleness (their next step replays).
        self.evicted = 0

    @classmethod
    def from_config(cls, config: GenerationConfig) -> SessionStore:
        return cls(max_bytes=config.kv_cache_bytes, idle_s=config.session_idle_s)

    def begin(self, key: SessionKey, position: int, tokens: int) -> Step:
        """The state for a step of ``tokens`` tokens at ``position``; a step at 0 starts afresh.

        Raises ``CoordinationError`` when the state covers another number of tokens than
        ``position`` (evicted, or never built on this worker): the coordinator replays.
        """
        with self._lock:
            self._evict_idle()
            entry = self._entries.get(key)
            if position == 0:
                entry = self._entries[key] = _Entry()
            elif entry is None or entry.length != position:
                held = "no state" if entry is None else f"state for {entry.length} tokens"
                raise CoordinationError(
                    f"session {key[1]} of {key[0]} has {held} on this stage; "
                    f"a step at position {position} needs {position} (replay the session)"
                )
            self._entries.move_to_end(key)
            entry.used_at = self._clock()
            return Step(position=position, state=entry.state)

    def commit(self, key: SessionKey, tokens: int) -> None:
        """The step of ``tokens`` tokens succeeded: account its state, evict beyond the budget."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.length += tokens
            entry.nbytes = state_bytes(entry.state)
            total = self._bytes()
            while total > self.max_bytes and len(self._entries) > 1:
                oldest = next(iter(self._entries))
                if oldest == key:
                    break
                total -= self._entries.pop(oldest).nbytes
                self.evicted += 1

    def expire_idle(self) -> None:
        """Drop sessions idle for ``idle_s`` (a step also does, but none may come)."""
        with self._lock:
            self._evict_idle()

    def discard(self, key: SessionKey) -> None:
        """A failed step may have left partial state: forget it."""
        with self._lock:
            self._entries.pop(key, None)

    def end(self, origin: str, session: int) -> None:
        """Free every stage's state of ``session`` (all epochs)."""
        with self._lock:
            for key in [k for k in self._entries if k[:2] == (origin, session)]:
                del self._entries[key]

    def held_bytes(self) -> int:
        """Bytes of state held now, every session's stages together."""
        with self._lock:
            return self._bytes()

    def sessions(self) -> int:
        """Generation sessions with state held here (one per coordinator's session)."""
        with self._lock:
            return len({k[:2] for k in self._entries})

    def _bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def _evict_idle(self) -> None:
        now = self._clock()
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if now - entry.used_at < self.idle_s:
                return
            del self._entries[key]
            self.evicted += 1

    def statistics(self) -> dict[str, int]:
        with self._lock:
            return {"sessions": len(self._entries), "bytes": self._bytes(), "evicted": self.evicted}
