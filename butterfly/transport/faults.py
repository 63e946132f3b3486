"""Seeded fault injection over the in-memory transport: drop, duplicate, reorder, delay, partition.

    net = FaultyNetwork(seed=7, drop=0.05, duplicate=0.05, reorder=0.05)
    worker = WorkerService(..., transport=net.node("mem://w0"), listen="mem://w0")
    ...
    net.partition({"mem://w0"}, {"mem://w1", "coordinator"})   # later: net.heal()
    net.faults            # every fault injected: (link, message index, kind)

Faults are applied where a frame is *received*, one decision per frame, drawn from a
random generator of its own for every direction of every connection, seeded by the
seed, the two ends' names and how many connections that pair opened before. A run's
faults therefore depend on the seed and on the sequence of frames on each link, not on
how trio interleaves tasks across links: when the system under test is deterministic
(see ``tests/chaos.py``: mock clock, compute on the event loop), a failing seed replays
the same faults on the same frames, with the same outcome.

Names: a node's view (:meth:`FaultyNetwork.node`) names the connections it dials after
the node, so give each node the view named by its own listen address, and the
coordinator a view of its own (partitions are between names).
"""

from __future__ import annotations

import collections
import random
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import attrs
import trio

from ..errors import ConfigError, NetworkError
from .base import Buffer, Check, Connection, ConnectionHandler, Mac, opened, sealed
from .memory import MemoryNetwork

__all__ = ["Fault", "FaultyNetwork"]


@attrs.frozen
class Fault:
    """One injected fault: the ``index``-th frame received on ``link`` (``"a->b#n"``)."""

    link: str
    index: int
    kind: str


class FaultyNetwork(MemoryNetwork):
    """A :class:`MemoryNetwork` whose connections lose, repeat, reorder and delay frames.

    Each probability applies independently to every frame received (drop first, then
    duplicate, reorder, delay). A reordered frame is held back until the next frame on
    its link has been delivered, or for ``max_delay_s`` when none comes; a delayed one
    waits up to ``max_delay_s`` before delivery (the frame that overtakes a held one is
    delivered as it is). ``enabled = False`` suspends all faults
    but partitions (e.g. while a test sets its cluster up).
    """

    def __init__(
        self,
        *,
        seed: int,
        drop: float = 0.0,
        duplicate: float = 0.0,
        reorder: float = 0.0,
        delay: float = 0.0,
        max_delay_s: float = 0.05,
        max_message_size: int = 1 << 30,
        buffer: int = 16,
    ) -> None:
        super().__init__(max_message_size=max_message_size, buffer=buffer)
        for name, p in {
            "drop": drop,
            "duplicate": duplicate,
            "reorder": reorder,
            "delay": delay,
        }.items():
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name} probability {p!r} is not in [0, 1]")
        if drop + duplicate + reorder + delay > 1.0:
            raise ConfigError(
                f"fault probabilities add up to {drop + duplicate + reorder + delay:g}; at most 1"
            )
        self.seed = seed
        self.drop = drop
        self.duplicate = duplicate
        self.reorder = reorder
        self.delay = delay
        self.max_delay_s = max_delay_s
        self.enabled = True
        #: Every fault injected so far, in the order they happened.
        self.faults: list[Fault] = []
        self._groups: list[frozenset[str]] = []
        self._pairs: collections.Counter[tuple[str, str]] = collections.Counter()

    # -- the test's controls ---------------------------------------------------------

    def node(self, name: str) -> _NodeView:
        """The transport for node ``name``: connections it dials are named after it."""
        return _NodeView(self, name)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut every link between nodes of different ``groups`` (names not listed are
        unaffected): frames across the cut vanish, new connections across it fail."""
        self._groups = [frozenset(g) for g in groups]

    def heal(self) -> None:
        self._groups = []

    def counts(self) -> dict[str, int]:
        """Faults injected so far, by kind."""
        return dict(collections.Counter(f.kind for f in self.faults))

    def cut(self, a: str, b: str) -> bool:
        """Whether a partition separates ``a`` from ``b``."""
        ga = next((g for g in self._groups if a in g), None)
        gb = next((g for g in self._groups if b in g), None)
        return ga is not None and gb is not None and ga is not gb

    # -- MemoryNetwork hooks ---------------------------------------------------------

    @asynccontextmanager
    async def connect(self, address: str, *, local: str = "") -> AsyncIterator[Connection]:
        if local and self.cut(local, address):
            raise NetworkError(f"{address} is unreachable from {local} (network partition)")
        async with super().connect(address, local=local) as conn:
            yield conn

    def _pair(self, client: str, server: str) -> tuple[Connection, Connection]:
        ours, theirs = super()._pair(client, server)
        n = self._pairs[(client, server)]
        self._pairs[(client, server)] += 1
        return (
            _FaultyConnection(ours, self, src=server, dst=client, ordinal=n),
            _FaultyConnection(theirs, self, src=client, dst=server, ordinal=n),
        )


class _NodeView:
    """One node's transport on a :class:`FaultyNetwork`."""

    def __init__(self, network: FaultyNetwork, name: str) -> None:
        self.network = network
        self.name = name

    def validate_address(self, address: str) -> None:
        self.network.validate_address(address)

    def connect(self, address: str) -> AbstractAsyncContextManager[Connection]:
        return self.network.connect(address, local=self.name)

    async def serve(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self.network.serve(address, handler, task_status=task_status)


class _FaultyConnection:
    """Wraps one end; faults the frames it receives (those sent from ``src`` to ``dst``)."""

    def __init__(
        self, inner: Connection, network: FaultyNetwork, *, src: str, dst: str, ordinal: int
    ) -> None:
        self._inner = inner
        self._net = network
        self._src = src
        self._dst = dst
        self.link = f"{src}->{dst}#{ordinal}"
        self._rng = random.Random(f"{network.seed}/{self.link}")
        self._index = 0
        self._delay_s = 0.0
        self._pending: collections.deque[Buffer] = collections.deque()

    @property
    def remote(self) -> str:
        return self._inner.remote

    @property
    def max_message_size(self) -> int:
        return self._inner.max_message_size

    @max_message_size.setter
    def max_message_size(self, size: int) -> None:
        self._inner.max_message_size = size

    async def send(self, *parts: Buffer, mac: Mac | None = None) -> None:
        await self._inner.send(*sealed(parts, mac))

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def abort(self) -> None:
        await self._inner.abort()

    def _record(self, index: int, kind: str) -> None:
        self._net.faults.append(Fault(self.link, index, kind))

    def _decide(self) -> tuple[int, str]:
        """The fault for the next frame: always draw the same numbers, so decisions for
        later frames do not depend on which fault an earlier one got."""
        index = self._index
        self._index += 1
        draw, wait = self._rng.random(), self._rng.random()
        net = self._net
        if self._net.cut(self._src, self._dst):
            return index, "partition"
        if not net.enabled:
            return index, ""
        for kind, p in (
            ("drop", net.drop),
            ("duplicate", net.duplicate),
            ("reorder", net.reorder),
            ("delay", net.delay),
        ):
            if draw < p:
                if kind == "delay":
                    self._delay_s = wait * net.max_delay_s
                return index, kind
            draw -= p
        return index, ""

    async def receive(self, check: Check | None = None) -> Buffer:
        # Faults act on frames as they travel, so before their tags are checked.
        return opened(await self._next_frame(), check)

    async def _next_frame(self) -> Buffer:
        if self._pending:
            return self._pending.popleft()
        while True:
            frame = await self._inner.receive()
            index, kind = self._decide()
            if kind:
                self._record(index, kind)
            if kind in ("drop", "partition"):
                continue
            if kind == "duplicate":
                self._pending.append(frame)
            elif kind == "delay":
                await trio.sleep(self._delay_s)
            elif kind == "reorder":
                with trio.move_on_after(self._net.max_delay_s):
                    try:
                        later = await self._inner.receive()
                    except NetworkError:
                        return frame  # the link closed: deliver what we held, then the error
                    self._pending.append(frame)
                    return later
            return frame
