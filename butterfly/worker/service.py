"""The worker: serves the stages it is assigned and forwards activations to the next stage's worker.

Links between workers are dialled by the *receiving* side: the worker of stage k
connects to the worker of stage k-1 (role ``link``), and stage k-1 sends activations on
that connection it accepted. Websocket clients must mask their frames in pure Python,
servers need not, so activations always travel in the fast direction.

Per coordinator (several may share the workers) the worker keeps that coordinator's
placement; an Activation names its coordinator (``origin``), epoch and stage.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

import attrs
import msgspec
import torch
import trio

from .._errors import unwrap_groups
from ..config import ButterflyConfig
from ..coordination.detector import PhiAccrualDetector
from ..coordination.liveness import measure_link, new_detector, watch_link
from ..coordination.verification import claim_of
from ..errors import (
    AuthenticationError,
    ButterflyError,
    ComputeError,
    CoordinationError,
    NetworkError,
    ProtocolError,
    error_kind,
)
from ..model import ModelInfo, ModelSource, StageRuntime
from ..model.profile import available_memory
from ..model.stage_sessions import SessionStore
from ..protocol import (
    PROTOCOL_VERSION,
    Ack,
    Activation,
    Assign,
    Assigned,
    Cancel,
    Checkpoint,
    Collect,
    EndSession,
    Error,
    Handshake,
    Heartbeat,
    Hello,
    LinkReport,
    Probe,
    Result,
    StageOutput,
    StageSpec,
    StageTrace,
    WireTensor,
)
from ..protocol.inputs import check_input
from ..transport import Connection, Peer, Transport, dial_peer, open_peer
from ..types import PROBE_BYTES

__all__ = ["WorkerService"]

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Cancelled request ids remembered per worker; older ones have long left the pipeline.
_CANCELLED_MEMORY = 10_000
#: Workers one worker keeps track of (and introduces itself to) at most.
MAX_PEERS = 256
#: Most bytes a worker sends back to answer one link probe.
_MAX_PROBE_REPLY = 16 * PROBE_BYTES
#: Placements kept per coordinator (the current one and the one before it).
_KEPT_EPOCHS = 2
#: Outputs a replica keeps for its coordinators' votes (each one until a Collect).
_WITHHELD_MEMORY = 64


@attrs.define
class _Plan:
    epoch: int
    stages: tuple[StageSpec, ...]
    checkpoint_interval: float = 0.0
    #: Further holders of stages, for verified requests (see ``Assign.replicas``).
    replicas: tuple[StageSpec, ...] = ()
    agreement: str = ""
    top_k: int = 0

    def holds(self, stage: int, node_id: str, *, report: bool) -> bool:
        """Whether ``node_id`` runs stage ``stage`` of this plan: its first holder always,
        a replica only for a verified request (one whose output goes back to be voted on)."""
        if not 0 <= stage < len(self.stages):
            return False
        if self.stages[stage].node_id == node_id:
            return True
        return report and any(r.index == stage and r.node_id == node_id for r in self.replicas)

    def mine(self, node_id: str) -> list[StageSpec]:
        return [s for s in (*self.stages, *self.replicas) if s.node_id == node_id]


class WorkerService:
    """One worker process's service. ``run`` serves until cancelled."""

    def __init__(
        self,
        source: ModelSource,
        *,
        transport: Transport,
        listen: str,
        config: ButterflyConfig | None = None,
        peers: tuple[str, ...] = (),
        advertise: str | None = None,
        node_id: str | None = None,
        max_memory: int | None = None,
        in_threads: bool = True,
        secret: bytes | None = None,
    ) -> None:
        self.source = source
        self.transport = transport
        self.listen = listen
        self.config = config or ButterflyConfig()
        self.peers = list(dict.fromkeys(peers))
        self.advertise = advertise
        self.node_id = node_id or f"worker-{uuid.uuid4().hex[:8]}"
        #: Load and compute in worker threads; False keeps everything on the event loop,
        #: which makes a simulation on a mock clock replay exactly (tests only).
        self.in_threads = in_threads
        #: The cluster's shared secret: every connection, accepted or dialled, proves it.
        self.secret = secret
        self.address = ""
        self.info: ModelInfo | None = None
        self.memory_available = 0
        #: Bytes of weights this worker may hold (``--max-memory``); None: what the device has.
        self.max_memory = max_memory
        # One device, one limiter: stages of this worker take turns on its cores.
        self.limiter = trio.CapacityLimiter(1)
        self._coordinators: dict[str, Peer] = {}
        #: Workers we introduced ourselves to (or are introducing ourselves to).
        self._announced: set[str] = set()
        #: Links from other workers to us, measured when we introduced ourselves, by sender.
        self._links_in: dict[str, LinkReport] = {}
        self._links_version = 0
        self._links_reported: dict[str, int] = {}  # coordinator → version it was last sent
        self._probe_seq = itertools.count()
        # Per coordinator, its last _KEPT_EPOCHS placements: requests already in the pipeline
        # when a worker joins finish on the placement they started on.
        self._plans: dict[str, dict[int, _Plan]] = {}
        self._runtimes: dict[tuple[int, int], StageRuntime] = {}
        self._downstream: dict[str, Peer] = {}
        self._upstream: dict[str, trio.Event] = {}
        self._links_changed = trio.Event()
        self._cancelled: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        #: Verified stage outputs this worker computed as a replica and only claimed, kept
        #: until the coordinator collects or drops them: by (origin, request id, stage).
        self._withheld: collections.OrderedDict[tuple[str, int, int], StageOutput] = (
            collections.OrderedDict()
        )
        self._assign_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._in_flight_limit = 4 * self.config.scheduling.max_in_flight
        self._in_flight = trio.Semaphore(self._in_flight_limit)
        #: State generation sessions keep on this worker's stages (KV caches).
        self.sessions = SessionStore.from_config(self.config.generation)
        #: Stage computations done, and requests dropped because they were cancelled.
        self.computed = 0
        self.dropped = 0
        #: Seconds of compute per stage (its layer range), for the worker's /metrics.
        self.stage_seconds: collections.defaultdict[tuple[int, int], float] = (
            collections.defaultdict(float)
        )
        #: Bytes per (peer node id, direction) of connections that ended; live ones are
        #: counted by their Peer (see traffic()).
        self._traffic: collections.Counter[tuple[str, str]] = collections.Counter()
        self._live_peers: dict[int, tuple[str, Peer]] = {}
        #: Bytes of weights of each stage held (its layer range).
        self.weights_bytes: dict[tuple[int, int], int] = {}

    # -- lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        """Describe the model, bind the listener, report the address, serve until cancelled."""
        self.info = await self._off_loop(self.source.describe)
        self.memory_available = available_memory(self.source.device)
        if self.max_memory is not None:
            self.memory_available = min(self.memory_available, self.max_memory)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            bound = await nursery.start(self.transport.serve, self.listen, self._handle_connection)
            self.address = self.advertise or bound
            self._learn_peers(tuple(self.peers))  # introduce ourselves to the --peers
            nursery.start_soon(self._expire_idle_sessions)
            task_status.started(self.address)

    async def _expire_idle_sessions(self) -> None:
        """Free the caches of sessions idle for ``generation.session_idle_s``, also when no
        step comes along to notice them (a client that vanished mid-generation)."""
        while True:
            await trio.sleep(self.config.generation.session_idle_s / 2)
            self.sessions.expire_idle()

    async def _off_loop(self, fn: Callable[..., T], *args: object) -> T:
        return await trio.to_thread.run_sync(fn, *args) if self.in_threads else fn(*args)

    def hello(self, role: str = "worker") -> Hello:
        assert self.info is not None
        return Hello(
            version=PROTOCOL_VERSION,
            node_id=self.node_id,
            role=role,
            model_name=self.info.name,
            fingerprint=self.info.fingerprint,
            address=self.address,
            num_layers=self.info.num_layers,
            peers=tuple(p for p in self.peers if p != self.address),
            input_spec=self.info.input_spec,
            layers=self.info.profiles,
            memory_available=self.memory_available,
            heartbeat_interval=self.config.coordination.heartbeat_interval,
            eos_token_ids=self.info.eos_token_ids,
        )

    def _open_peer(self, conn: Connection) -> AbstractAsyncContextManager[Peer]:
        net = self.config.network
        return open_peer(
            conn,
            max_message_size=net.max_message_size,
            send_queue_size=net.send_queue_size,
            secret=self.secret,
        )

    # -- accepted connections ------------------------------------------------------------

    async def _handle_connection(self, conn: Connection) -> None:
        assert self.info is not None
        async with self._open_peer(conn) as peer:
            check = Handshake(
                self.hello(),
                expect_roles=frozenset({"coordinator", "link", "member"}),
            )
            try:
                hello = await peer.handshake(
                    self.hello(), check, timeout=self.config.network.connect_timeout
                )
                if hello.role == "coordinator" and hello.node_id in self._coordinators:
                    # First connection wins: a second one with the same id (the same client
                    # under another address of ours, or an impostor) must not take over its
                    # Results, nor drop its placement when it leaves.
                    raise CoordinationError(
                        f"coordinator {hello.node_id!r} is already connected to this worker"
                    )
                if hello.role == "link" and (
                    hello.fingerprint != self.info.fingerprint or hello.model_name != self.info.name
                ):
                    raise CoordinationError(
                        f"worker {hello.node_id!r} serves {hello.model_name!r} with fingerprint "
                        f"{hello.fingerprint[:16]}; this worker serves {self.info.name!r} with "
                        f"{self.info.fingerprint[:16]}"
                    )
            except AuthenticationError as exc:
                # Nothing is said to a peer that did not authenticate.
                log.warning("refused connection from %s: %s", conn.remote, exc)
                return
            except ButterflyError as exc:
                log.warning("refused connection from %s: %s", conn.remote, exc)
                await _send_quietly(peer, Error(kind=error_kind(exc), message=str(exc)))
                return
            with self._metered(hello.node_id, peer):
                if hello.role == "coordinator":
                    await self._serve_coordinator(peer, hello)
                elif hello.role == "member":
                    self._learn_peers((hello.address, *hello.peers))
                    await self._answer_probes(peer)
                else:
                    await self._serve_downstream(peer, hello)

    @contextlib.contextmanager
    def _metered(self, node_id: str, peer: Peer) -> Iterator[None]:
        """Count ``peer``'s traffic under ``node_id`` while it lasts, and keep the totals after."""
        self._live_peers[id(peer)] = (node_id, peer)
        try:
            yield
        finally:
            del self._live_peers[id(peer)]
            self._traffic[(node_id, "out")] += peer.bytes_sent
            self._traffic[(node_id, "in")] += peer.bytes_received

    def queue_depth(self) -> int:
        """Activations admitted and not yet done."""
        return self._in_flight_limit - self._in_flight.value

    def held_stages(self) -> list[tuple[int, int]]:
        """The layer ranges of the stages this worker holds for some coordinator."""
        return sorted(self._runtimes)

    def traffic(self) -> dict[tuple[str, str], int]:
        """Bytes to (``out``) and from (``in``) each peer node id since the worker started."""
        totals = collections.Counter(self._traffic)
        for node_id, peer in self._live_peers.values():
            totals[(node_id, "out")] += peer.bytes_sent
            totals[(node_id, "in")] += peer.bytes_received
        return dict(totals)

    async def _serve_coordinator(self, peer: Peer, hello: Hello) -> None:
        origin = hello.node_id
        self._coordinators[origin] = peer
        try:
            async with trio.open_nursery() as nursery:
                detector = self._watch(nursery, peer, hello, f"coordinator {origin}", send=False)
                await self._coordinator_loop(peer, origin, detector)
                nursery.cancel_scope.cancel()
        finally:
            if self._coordinators.get(origin) is peer:
                del self._coordinators[origin]
                self._plans.pop(origin, None)
                # A reconnecting coordinator (or one whose Ack was lost) hears them again.
                self._links_reported.pop(origin, None)
                self._release_unused_stages()

    def _watch(
        self, nursery: trio.Nursery, peer: Peer, hello: Hello, label: str, *, send: bool
    ) -> PhiAccrualDetector:
        """Heartbeats on a long-lived link (see :mod:`butterfly.coordination.liveness`);
        the side that sends them paces them (their answers come back at that pace): expect
        our own interval when we send, the other side's (from its Hello) when it does."""
        cfg = self.config.coordination
        detector = new_detector(cfg, interval=None if send else hello.heartbeat_interval)
        nursery.start_soon(
            functools.partial(watch_link, peer, detector, cfg, label=label, send_heartbeats=send)
        )
        return detector

    async def _coordinator_loop(
        self, peer: Peer, origin: str, detector: PhiAccrualDetector
    ) -> None:
        while True:
            message = await _receive_or_none(peer)
            match message:
                case None:
                    return
                case Heartbeat(seq=seq) | Probe(seq=seq):
                    detector.heartbeat(trio.current_time())
                    await peer.send(
                        Ack(
                            seq=seq,
                            peers=(self.address, *self.peers),
                            links=self._links_for(origin),
                            kv_cache_bytes=self.sessions.held_bytes(),
                        )
                    )
                case Assign():
                    self._spawn(self._assign, origin, message)
                case Activation() if message.origin != origin:
                    # Results go to the origin's connection: a client must not name another.
                    raise ProtocolError(
                        f"coordinator {origin!r} sent an Activation for {message.origin!r}"
                    )
                case Activation():
                    await self._admit(message)
                case Cancel(request_id=rid):
                    self._cancel(origin, rid)
                case EndSession(session=session):
                    self.sessions.end(origin, session)
                case Collect(request_id=rid, stage=stage, send=send):
                    output = self._withheld.pop((origin, rid, stage), None)
                    if send and output is not None:
                        await self._answer(peer, origin, output)
                case _:
                    log.info("ignoring %s from coordinator %s", type(message).__name__, origin)

    async def _serve_downstream(self, peer: Peer, hello: Hello) -> None:
        """A worker pulls activations from us on this connection; we only send on it."""
        self._downstream[hello.node_id] = peer
        self._signal_links()
        try:
            async with trio.open_nursery() as nursery:
                label = f"downstream worker {hello.node_id}"
                detector = self._watch(nursery, peer, hello, label, send=False)
                while True:
                    message = await _receive_or_none(peer)
                    if message is None:
                        break
                    if isinstance(message, Heartbeat):
                        detector.heartbeat(trio.current_time())
                        await peer.send(Ack(seq=message.seq))
                nursery.cancel_scope.cancel()
        finally:
            if self._downstream.get(hello.node_id) is peer:
                del self._downstream[hello.node_id]
                self._signal_links()

    # -- membership ------------------------------------------------------------------------

    def _learn_peers(self, addresses: tuple[str, ...]) -> None:
        for address in addresses:
            if len(self._announced) >= MAX_PEERS:
                # A peer's Hello or Ack must not make us dial thousands of addresses.
                log.warning("ignoring peers beyond %d known ones (e.g. %s)", MAX_PEERS, address)
                return
            if address and address != self.address and address not in self.peers:
                self.peers.append(address)
            if address and address != self.address and address not in self._announced:
                # Introduce ourselves to every worker we hear of: the cluster becomes a
                # full mesh of acquaintances, and each pair's link gets measured.
                self._announced.add(address)
                self._spawn(self._announce, address)

    async def _announce(self, address: str) -> None:
        """Tell a worker about us, learn whom it knows, and measure its link to us."""
        try:
            with unwrap_groups():
                await self._introduce(address)
        except ButterflyError as exc:
            log.warning("could not introduce this worker to peer %s: %s", address, exc)

    async def _introduce(self, address: str) -> None:
        net = self.config.network
        async with dial_peer(self.transport, address, net, secret=self.secret) as peer:
            check = Handshake(self.hello("member"), expect_roles=frozenset({"worker"}))
            hello = await peer.handshake(self.hello("member"), check, timeout=net.connect_timeout)
            self._learn_peers((hello.address, *hello.peers))
            # Activations from that worker to us would travel on a connection we dialled,
            # sent by it as the server: measure that direction (its replies to our probes).
            with trio.move_on_after(net.connect_timeout):
                link = await measure_link(functools.partial(self._probe, peer))
                source = hello.address or address
                self._links_in[source] = LinkReport(
                    source, link.bandwidth_bytes_per_s, link.latency_s
                )
                self._links_version += 1

    async def _probe(self, peer: Peer, reply_bytes: int) -> float:
        """Seconds until ``peer`` answers a Probe asking for ``reply_bytes`` back."""
        seq = next(self._probe_seq)
        start = time.perf_counter()
        await peer.send(Probe(seq=seq, reply_bytes=reply_bytes))
        while True:
            message = await peer.receive()
            if isinstance(message, Ack) and message.seq == seq:
                return time.perf_counter() - start

    async def _answer_probes(self, peer: Peer) -> None:
        """Serve a member's link measurement until it hangs up."""
        with trio.move_on_after(self.config.network.connect_timeout * 2):
            while True:
                message = await _receive_or_none(peer)
                if message is None:
                    return
                if isinstance(message, Probe):
                    payload = bytes(min(message.reply_bytes, _MAX_PROBE_REPLY))
                    await peer.send(Ack(seq=message.seq, payload=payload))

    def _links_for(self, origin: str) -> tuple[LinkReport, ...]:
        """Our measured links, when they changed since ``origin`` last heard them."""
        if self._links_reported.get(origin) == self._links_version:
            return ()
        self._links_reported[origin] = self._links_version
        return tuple(self._links_in.values())

    # -- assignment ------------------------------------------------------------------------

    async def _assign(self, origin: str, assign: Assign) -> None:
        peer = self._coordinators.get(origin)
        try:
            async with self._assign_lock:
                self._check_plan(assign)
                plan = _Plan(
                    assign.epoch,
                    assign.stages,
                    assign.checkpoint_interval,
                    assign.replicas,
                    assign.agreement,
                    assign.top_k,
                )
                mine = plan.mine(self.node_id)
                self._check_memory(origin, assign.epoch, mine)
                for spec in mine:
                    if (spec.start, spec.stop) not in self._runtimes:
                        began = time.perf_counter()
                        layers = await self._off_loop(
                            self.source.build_layers, spec.start, spec.stop
                        )
                        self.weights_bytes[(spec.start, spec.stop)] = sum(
                            t.numel() * t.element_size()
                            for t in (*layers.parameters(), *layers.buffers())
                        )
                        log.info(
                            "loaded layers %d..%d in %.2f s (%d bytes of weights)",
                            spec.start,
                            spec.stop - 1,
                            time.perf_counter() - began,
                            self.weights_bytes[(spec.start, spec.stop)],
                        )
                        self._runtimes[(spec.start, spec.stop)] = StageRuntime(
                            layers,
                            start=spec.start,
                            stop=spec.stop,
                            device=self.source.device,
                            limiter=self.limiter,
                            max_bytes=self.config.network.max_message_size,
                            in_thread=self.in_threads,
                            sessions=self.sessions,
                        )
                plans = self._plans.setdefault(origin, {})
                plans[assign.epoch] = plan
                for old in sorted(plans)[:-_KEPT_EPOCHS]:
                    del plans[old]
                self._release_unused_stages()
            # Linking waits on other workers, up to 2 × connect_timeout for one that does
            # not answer: outside the lock, so that one placement naming an unreachable
            # upstream does not hold up every other coordinator's.
            try:
                await self._link_upstreams(
                    assign, [s for s in assign.stages if s.node_id == self.node_id]
                )
            except ButterflyError:
                async with self._assign_lock:
                    self._plans.get(origin, {}).pop(assign.epoch, None)
                    self._release_unused_stages()
                raise
            if peer is not None:
                await peer.send(Assigned(epoch=assign.epoch, node_id=self.node_id))
        except ButterflyError as exc:
            log.warning("assignment %d from %s failed: %s", assign.epoch, origin, exc)
            if peer is not None:
                await _send_quietly(peer, Error(kind=error_kind(exc), message=str(exc)))

    async def _link_upstreams(self, assign: Assign, mine: list[StageSpec]) -> None:
        upstreams = {
            assign.stages[s.index - 1].node_id: assign.stages[s.index - 1]
            for s in mine
            if s.index > 0 and assign.stages[s.index - 1].node_id != self.node_id
        }
        with unwrap_groups():
            async with trio.open_nursery() as nursery:
                for upstream in upstreams.values():
                    nursery.start_soon(self._ensure_upstream_link, upstream)

    def _check_plan(self, assign: Assign) -> None:
        assert self.info is not None
        expected_start = 0
        for i, spec in enumerate(assign.stages):
            if spec.index != i or spec.start != expected_start or spec.stop <= spec.start:
                raise CoordinationError(
                    f"placement of epoch {assign.epoch} is not a contiguous cover of the layers: "
                    f"stage {i} is [{spec.start}, {spec.stop}), expected to start at {expected_start}"
                )
            expected_start = spec.stop
        for spec in assign.replicas:
            if not (
                0 <= spec.index < len(assign.stages)
                and (spec.start, spec.stop)
                == (
                    assign.stages[spec.index].start,
                    assign.stages[spec.index].stop,
                )
            ):
                raise CoordinationError(
                    f"placement of epoch {assign.epoch} names a replica of stage {spec.index} "
                    f"with layers [{spec.start}, {spec.stop}) that no stage has"
                )
        if expected_start != self.info.num_layers:
            raise CoordinationError(
                f"placement of epoch {assign.epoch} covers {expected_start} layers; "
                f"the model has {self.info.num_layers}"
            )

    def _check_memory(self, origin: str, epoch: int, mine: list[StageSpec]) -> None:
        """Refuse stages whose weights, with those every other coordinator's placement
        holds here, exceed ``--max-memory`` (placement should never ask; a coordinator that
        does must not make us hold copy after copy of the model). The origin's own earlier
        placements do not count: they are kept only for the requests still on them."""
        assert self.info is not None
        if self.max_memory is None or not self.info.profiles:
            return
        held = {
            (s.start, s.stop)
            for other, plans in self._plans.items()
            if other != origin and plans
            for s in plans[max(plans)].mine(self.node_id)
        }
        ranges = held | {(s.start, s.stop) for s in mine}
        needed = sum(
            self.info.profiles[i].memory_bytes for start, stop in ranges for i in range(start, stop)
        )
        if needed > self.max_memory:
            raise CoordinationError(
                f"placement epoch {epoch} gives worker {self.node_id} {needed} bytes of weights "
                f"(with the stages other coordinators placed here); its --max-memory is "
                f"{self.max_memory}"
            )

    def _release_unused_stages(self) -> None:
        used = {
            (s.start, s.stop)
            for plans in self._plans.values()
            for plan in plans.values()
            for s in plan.mine(self.node_id)
        }
        for key in [k for k in self._runtimes if k not in used]:
            del self._runtimes[key]
            self.weights_bytes.pop(key, None)

    async def _ensure_upstream_link(self, upstream: StageSpec) -> None:
        ready = self._upstream.get(upstream.node_id)
        if ready is None:
            ready = trio.Event()
            self._upstream[upstream.node_id] = ready
            self._spawn(self._pull_from, upstream, ready)
        with trio.move_on_after(self.config.network.connect_timeout * 2):
            await ready.wait()
        if not ready.is_set() or self._upstream.get(upstream.node_id) is not ready:
            raise NetworkError(
                f"cannot link to upstream worker {upstream.node_id!r} at {upstream.address}"
            )

    async def _pull_from(self, upstream: StageSpec, ready: trio.Event) -> None:
        """Dial the upstream worker and compute the activations it sends us, until the link breaks."""
        try:
            with unwrap_groups():
                await self._pull(upstream, ready)
        except ButterflyError as exc:
            log.warning("link to upstream %s ended: %s", upstream.address, exc)
        finally:
            if self._upstream.get(upstream.node_id) is ready:
                del self._upstream[upstream.node_id]
        # A link that broke (a suspected or restarted peer) is dialled again while the
        # current placement still needs it; a new placement without it ends the loop.
        await trio.sleep(self.config.network.reconnect_initial_delay)
        if upstream.node_id not in self._upstream and self._needs_upstream(upstream):
            again = self._upstream[upstream.node_id] = trio.Event()
            self._spawn(self._pull_from, upstream, again)

    def _needs_upstream(self, upstream: StageSpec) -> bool:
        """Whether the latest placement of some coordinator has us right after ``upstream``."""
        for plans in self._plans.values():
            stages = plans[max(plans)].stages if plans else ()
            for spec in stages:
                if spec.node_id == self.node_id and spec.index > 0:
                    before = stages[spec.index - 1]
                    if (before.node_id, before.address) == (upstream.node_id, upstream.address):
                        return True
        return False

    async def _pull(self, upstream: StageSpec, ready: trio.Event) -> None:
        net = self.config.network
        assert self.info is not None
        async with dial_peer(self.transport, upstream.address, net, secret=self.secret) as peer:
            check = Handshake(
                self.hello("link"),
                expect_roles=frozenset({"worker"}),
                expect_model=self.info.name,
                expect_fingerprint=self.info.fingerprint,
            )
            hello = await peer.handshake(self.hello("link"), check, timeout=net.connect_timeout)
            with self._metered(hello.node_id, peer):
                await self._pull_activations(peer, hello, upstream, ready)

    async def _pull_activations(
        self, peer: Peer, hello: Hello, upstream: StageSpec, ready: trio.Event
    ) -> None:
        ready.set()
        async with trio.open_nursery() as nursery:
            label = f"upstream worker {upstream.node_id}"
            detector = self._watch(nursery, peer, hello, label, send=True)
            while True:
                message = await _receive_or_none(peer)
                if message is None:
                    break
                if isinstance(message, Activation):
                    await self._admit(message)
                elif isinstance(message, Ack):
                    detector.heartbeat(trio.current_time())
            nursery.cancel_scope.cancel()

    # -- the data path ---------------------------------------------------------------------

    async def _admit(self, activation: Activation) -> None:
        received = time.time()  # (the wait for a slot counts as the stage's wait)
        # Bounded work per worker: when full, stop reading, which backpressures the sender.
        await self._in_flight.acquire()
        self._spawn(self._process, activation, received)

    async def _process(self, activation: Activation, received: float) -> None:
        try:
            await self._run_stages(activation, received)
        except ButterflyError as exc:  # a request failure, never a worker failure
            await self._report(activation, exc)
        finally:
            self._in_flight.release()

    async def _run_stages(self, activation: Activation, received: float) -> None:
        origin, rid = activation.origin, activation.request_id
        plan = self._plans.get(origin, {}).get(activation.epoch)
        if plan is None:
            raise CoordinationError(
                f"worker {self.node_id} has no placement of epoch {activation.epoch} for {origin!r}"
            )
        tensor = activation.tensor
        stage = activation.stage
        if not plan.holds(stage, self.node_id, report=activation.report):
            raise CoordinationError(
                f"worker {self.node_id} does not hold stage {stage} of epoch {activation.epoch}"
            )
        first = activation.layer
        if not plan.stages[stage].start <= first < plan.stages[stage].stop:
            raise CoordinationError(
                f"layer {first} is not in stage {stage} of epoch {activation.epoch} "
                f"(layers {plan.stages[stage].start}..{plan.stages[stage].stop - 1})"
            )
        if first == 0:
            # The client checked this too, but a worker does not rely on its clients. A
            # session's rectangle may be wider than any of its rows' real tokens (rows join
            # later, padded): its length is checked by the coordinator, per generation.
            assert self.info is not None
            accepts = self.info.input_spec
            if activation.session and accepts.max_length:
                accepts = msgspec.structs.replace(accepts, max_length=0)
            check_input(tensor, accepts, max_bytes=self.config.network.max_message_size)
        compute_s = activation.compute_s
        trace = list(activation.trace)
        while True:
            if (origin, rid) in self._cancelled:
                self.dropped += 1
                return
            spec = plan.stages[stage]
            runtime = self._runtimes[(spec.start, spec.stop)]
            started = trio.current_time()
            key = (origin, activation.session, activation.epoch, spec.start)
            spent: list[float] = []
            try:
                tensor = await runtime.forward(
                    tensor,
                    first=first,
                    session=key if activation.session else None,
                    position=activation.position,
                    keep=activation.keep,
                    spent=spent,
                )
            except ButterflyError:
                raise
            except Exception as exc:
                raise ComputeError(
                    f"stage {stage} (layers {first}..{spec.stop - 1}) on worker "
                    f"{self.node_id} raised {type(exc).__name__}: {exc}"
                ) from exc
            compute_s += trio.current_time() - started
            self.computed += 1
            forward_s = spent[0] if spent else 0.0
            self.stage_seconds[(spec.start, spec.stop)] += forward_s
            done = time.time()
            trace.append(
                StageTrace(
                    stage=stage, node_id=self.node_id, received=received, done=done,
                    wait_s=max(done - received - forward_s, 0.0), compute_s=forward_s,
                    out_bytes=tensor.data.nbytes,
                )
            )  # fmt: skip
            received = done
            if (origin, rid) in self._cancelled:
                self.dropped += 1
                return
            peer = self._coordinators.get(origin)
            if activation.report:
                if peer is not None:
                    await self._report_output(peer, activation, plan, tensor, tuple(trace))
                return
            stage += 1
            if stage == len(plan.stages):
                if peer is not None:
                    result = Result(rid, activation.epoch, tuple(trace), tensor)
                    await self._answer(peer, origin, result)
                return
            first = plan.stages[stage].start
            checkpoint = None
            if (
                plan.checkpoint_interval
                and compute_s >= plan.checkpoint_interval
                and peer
                and not activation.session  # a session re-runs by replaying its tokens
            ):
                # A long request: let its coordinator keep this boundary (see Checkpoint).
                checkpoint = Checkpoint(
                    request_id=rid, epoch=activation.epoch, layer=first, tensor=tensor
                )
                compute_s = 0.0
            nxt = plan.stages[stage]
            if nxt.node_id == self.node_id:
                if checkpoint is not None and peer is not None:
                    with contextlib.suppress(NetworkError):
                        peer.send_nowait(checkpoint)  # a coordinator that is behind can do without
            else:
                link = await self._downstream_link(nxt)
                await link.send(
                    Activation(
                        request_id=rid,
                        epoch=activation.epoch,
                        stage=stage,
                        origin=origin,
                        layer=first,
                        compute_s=compute_s,
                        session=activation.session,
                        position=activation.position,
                        keep=activation.keep,
                        trace=tuple(trace),
                        report=False,
                        tensor=tensor,
                    )
                )
                # After the hand-off: the copy for the coordinator is off the critical path.
                if checkpoint is not None and peer is not None:
                    with contextlib.suppress(NetworkError):
                        peer.send_nowait(checkpoint)  # a coordinator that is behind can do without
                return

    async def _report_output(
        self,
        peer: Peer,
        activation: Activation,
        plan: _Plan,
        tensor: WireTensor,
        trace: tuple[StageTrace, ...],
    ) -> None:
        """Answer a verified request: the stage's first holder sends its output, which its
        coordinator checks itself; a replica sends only its claim and keeps the output
        until the coordinator collects it (it needs it only when the first holder lied)."""
        origin, rid, stage = activation.origin, activation.request_id, activation.stage
        output = StageOutput(rid, activation.epoch, stage, b"", None, trace, tensor)
        if plan.stages[stage].node_id != self.node_id:
            claim = await self._off_loop(claim_of, tensor, plan.agreement, plan.top_k)
            digest = claim if isinstance(claim, bytes) else b""
            proof = None if isinstance(claim, bytes) else claim
            self._withheld[(origin, rid, stage)] = output
            while len(self._withheld) > _WITHHELD_MEMORY:
                self._withheld.popitem(last=False)
            output = StageOutput(rid, activation.epoch, stage, digest, proof, trace, None)
        await self._answer(peer, origin, output)

    async def _downstream_link(self, spec: StageSpec) -> Peer:
        # The downstream worker dials us while it accepts its assignment; allow it to land.
        with trio.move_on_after(self.config.network.connect_timeout):
            while spec.node_id not in self._downstream:
                await self._links_changed.wait()
        link = self._downstream.get(spec.node_id)
        if link is None:
            raise NetworkError(
                f"worker {self.node_id} has no link to stage {spec.index}'s worker {spec.node_id!r} "
                f"at {spec.address}"
            )
        return link

    def _signal_links(self) -> None:
        self._links_changed.set()
        self._links_changed = trio.Event()

    def _cancel(self, origin: str, request_id: int) -> None:
        self._cancelled[(origin, request_id)] = None
        while len(self._cancelled) > _CANCELLED_MEMORY:
            self._cancelled.popitem(last=False)

    async def _answer(self, peer: Peer, origin: str, result: Result | StageOutput) -> None:
        """Hand a Result to its coordinator without waiting on it. One that lets its queue
        fill is not reading, and it must not hold this worker's tasks (and with them every
        other client's requests) while it does not: its connection is aborted instead."""
        try:
            if peer.send_nowait(result):
                return
        except NetworkError:
            return
        log.warning(
            "coordinator %s does not read its results (%d queued); closing its connection",
            origin,
            self.config.network.send_queue_size,
        )
        await peer.conn.abort()

    async def _report(self, activation: Activation, exc: ButterflyError) -> None:
        peer = self._coordinators.get(activation.origin)
        if peer is not None:
            error = Error(
                kind=error_kind(exc),
                message=str(exc),
                request_id=activation.request_id,
                origin=activation.origin,
            )
            await _send_quietly(peer, error)

    def _spawn(self, fn: Callable[..., object], *args: object) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)  # type: ignore[arg-type]

    def statistics(self) -> dict[str, object]:
        """Introspection for tests and logs."""
        return {
            "node_id": self.node_id,
            "coordinators": sorted(self._coordinators),
            "stages": sorted(self._runtimes),
            "downstream": sorted(self._downstream),
            "upstream": sorted(self._upstream),
            "threads": torch.get_num_threads(),
            "computed": self.computed,
            "dropped": self.dropped,
        }


async def _receive_or_none(peer: Peer) -> object | None:
    """Next message, or ``None`` when the connection closed."""
    try:
        return await peer.receive()
    except NetworkError:
        return None


async def _send_quietly(peer: Peer, message: Error) -> None:
    try:
        await peer.send(message)
    except ButterflyError:
        pass
