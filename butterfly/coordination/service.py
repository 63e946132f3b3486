"""The coordinator's view of the cluster: membership, liveness, and the current placement.

One session task per worker address holds the coordinator→worker connection: it
sends heartbeats, hears Acks, Assigned and Results, and reconnects with backoff
after a failure so that a restarted worker is used again. Results and failures go
to the scheduler through a typed memory channel, never by reaching into its state.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Iterator

import attrs
import msgspec
import trio

from .._errors import unwrap_groups
from ..config import ButterflyConfig, CoordinationConfig
from ..errors import (
    ERROR_KINDS,
    ApiError,
    AuthenticationError,
    ButterflyError,
    CoordinationError,
    FingerprintMismatch,
    NetworkError,
    PartitionError,
)
from ..metrics import MetricsSink
from ..metrics.events import (
    BytesTransferred,
    CacheReported,
    ConsensusReached,
    MessageReceived,
    MessageSent,
    NodeFailure,
    PhaseTransition,
    PlacementChanged,
    WorkerQuarantined,
    WorkerStateChanged,
)
from ..partition import PartitionService, Plan
from ..protocol import (
    PROTOCOL_VERSION,
    Ack,
    Assign,
    Assigned,
    Checkpoint,
    Error,
    Handshake,
    Hello,
    InputSpec,
    Message,
    Probe,
    Result,
    StageOutput,
    StageSpec,
)
from ..transport import Peer, Transport, dial_peer
from ..transport.retry import backoff_delays
from ..types import (
    ClusterInfo,
    LayerInfo,
    Link,
    NodeCapability,
    StageInfo,
    Topology,
    WorkerInfo,
    WorkerState,
)
from .detector import PhiAccrualDetector
from .liveness import measure_link, new_detector, watch_link
from .phases import Phase, PhaseTracker

__all__ = ["CoordinationService", "Placement", "Reported", "WorkerLost", "replica_groups"]

log = logging.getLogger(__name__)

#: Memory assumed for a worker that did not report any (it is never the constraint).
_UNKNOWN_MEMORY = 1 << 62


@attrs.frozen
class WorkerLost:
    """Sent to the scheduler when a worker's session ends: its in-flight requests fail."""

    node_id: str
    address: str
    reason: str


@attrs.frozen
class Reported:
    """A request's message from worker ``node_id``: the sender matters when replicas vote."""

    node_id: str
    message: StageOutput | Error


#: What the scheduler receives from the coordination service.
Response = Result | Reported | Checkpoint | WorkerLost


@attrs.frozen
class Placement:
    epoch: int
    stages: tuple[StageSpec, ...]
    #: The ready workers the plan was made for; idle ones included.
    planned_over: frozenset[str] = frozenset()
    #: Further holders of stages, which verified requests also run on.
    replicas: tuple[StageSpec, ...] = ()

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(s.node_id for s in (*self.stages, *self.replicas))

    def holders(self, index: int) -> list[str]:
        """The workers holding stage ``index``: its first holder, then its replicas."""
        return [self.stages[index].node_id] + [r.node_id for r in self.replicas if r.index == index]


@attrs.define(eq=False)
class _Worker:
    address: str
    state: WorkerState = WorkerState.CONNECTING
    hello: Hello | None = None
    peer: Peer | None = None
    reason: str = ""
    #: The last attempt failed authentication (a wrong or missing secret on one side).
    unauthenticated: bool = False
    first_attempt: trio.Event = attrs.field(factory=trio.Event)
    detector: PhiAccrualDetector | None = None
    #: Pings waiting for their Ack, by sequence number.
    acks: dict[int, trio.Event] = attrs.field(factory=dict)
    seq: Iterator[int] = attrs.field(factory=itertools.count)
    #: The coordinator's measured link to this worker (None until measured).
    link: Link | None = None
    #: Links from other workers to this one, as it measured them, by sender address.
    links_in: dict[str, Link] = attrs.field(factory=dict)
    assigned: dict[int, trio.Event] = attrs.field(factory=dict)
    assign_error: str = ""

    @property
    def node_id(self) -> str:
        return self.hello.node_id if self.hello else ""


class CoordinationService:
    """Discovers the workers from seed addresses, keeps them alive, and assigns stages."""

    def __init__(
        self,
        seeds: tuple[str, ...],
        *,
        transport: Transport,
        config: ButterflyConfig,
        metrics: MetricsSink,
        partition: PartitionService,
        responses: trio.MemorySendChannel[Response],
        node_id: str | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.seeds = seeds
        self.secret = secret
        self.transport = transport
        self.config = config
        self.metrics = metrics
        self.partition = partition
        self.responses = responses
        self.node_id = node_id or f"coordinator-{uuid.uuid4().hex[:8]}"
        self._workers: dict[str, _Worker] = {}  # by address
        self._placement: Placement | None = None
        self._plan: Plan | None = None
        # Epochs not yet committed: their phase and how many requests still use them.
        self._epoch_phases: dict[int, PhaseTracker] = {}
        self._epoch_requests: collections.Counter[int] = collections.Counter()
        self._epoch = 0
        self._placement_lock = trio.Lock()
        self._model = ""
        self._fingerprint = ""
        self._num_layers = 0
        self.input_spec = InputSpec()
        #: The model's EOS tokens (what a generation stops at by default).
        self.eos_token_ids: tuple[int, ...] = ()
        self._nursery: trio.Nursery | None = None
        #: The first placement is made: later changes of the worker set re-plan at once.
        self._serving = False
        #: Workers caught lying, by node id, with the evidence: never placed until released.
        self.quarantined: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Discover the cluster, check the weights agree, place the model; then keep sessions alive."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for address in self.seeds:
                self._add_address(address)
            await self._settle_discovery()
            self._adopt_model()
            await self.ensure_placement()
            self._serving = True
            task_status.started()

    def _add_address(self, address: str) -> None:
        if address and address not in self._workers:
            worker = _Worker(address=address)
            self._workers[address] = worker
            assert self._nursery is not None
            self._nursery.start_soon(self._session, worker)

    async def _settle_discovery(self) -> None:
        # Peers learned from Hellos add sessions while we wait: loop until none is new.
        while True:
            pending = [w for w in self._workers.values() if not w.first_attempt.is_set()]
            if not pending:
                return
            for worker in pending:
                await worker.first_attempt.wait()

    def _adopt_model(self) -> None:
        ready = [w for w in self._workers.values() if w.state is WorkerState.READY]
        if not ready:
            tried = "; ".join(
                f"{w.address} ({w.reason or 'unreachable'})" for w in self._workers.values()
            )
            if all(w.unauthenticated for w in self._workers.values()):
                raise AuthenticationError(f"no worker accepted this client: {tried}")
            raise NetworkError(f"no worker reachable; tried {tried}")
        groups: dict[tuple[str, str], list[_Worker]] = {}
        for w in ready:
            assert w.hello is not None
            groups.setdefault((w.hello.model_name, w.hello.fingerprint), []).append(w)
        if len(groups) > 1:
            detail = "; ".join(
                f"{', '.join(w.address for w in ws)} serve {model!r} with fingerprint {fp[:16]}"
                for (model, fp), ws in groups.items()
            )
            raise FingerprintMismatch(
                f"workers hold different weights and cannot be combined: {detail}. Give every "
                "worker the same --weights file; a model factory without --weights must be "
                "deterministic (seed its random generator)."
            )
        (self._model, self._fingerprint), members = next(iter(groups.items()))
        hello = members[0].hello
        assert hello is not None
        self._num_layers = hello.num_layers
        self.input_spec = hello.input_spec or InputSpec()
        self.eos_token_ids = hello.eos_token_ids

    # -- sessions ----------------------------------------------------------------------

    def _set_state(self, worker: _Worker, state: WorkerState, reason: str = "") -> None:
        if state in (WorkerState.READY, WorkerState.QUARANTINED) and (
            worker.node_id in self.quarantined
        ):
            state, reason = WorkerState.QUARANTINED, self.quarantined[worker.node_id]
        worker.state = state
        worker.reason = reason
        if worker.node_id:
            self.metrics.emit(WorkerStateChanged(worker.node_id, str(state)))

    def _hello(self) -> Hello:
        return Hello(
            version=PROTOCOL_VERSION,
            node_id=self.node_id,
            role="coordinator",
            heartbeat_interval=self.config.coordination.heartbeat_interval,
        )

    async def _session(self, worker: _Worker) -> None:
        """Hold the link to one worker; reconnect with capped backoff after each failure."""
        net = self.config.network
        delays = backoff_delays(64, net.reconnect_initial_delay, net.reconnect_max_delay)
        failures = 0
        while True:
            try:
                with unwrap_groups():
                    await self._connect_and_serve(worker)
                failures = 0
            except ButterflyError as exc:
                reason = str(exc)
                worker.unauthenticated = isinstance(exc, AuthenticationError)
                failures += 1
            except Exception as exc:
                # A bug on one link must not take the client down: log it, treat it as a failure.
                log.exception("session with worker at %s failed unexpectedly", worker.address)
                reason = f"unexpected {type(exc).__name__}: {exc}"
                failures += 1
            else:
                reason = "connection closed"
                worker.unauthenticated = False
            finally:
                worker.peer = None
                worker.first_attempt.set()
            lost = worker.state in (WorkerState.READY, WorkerState.QUARANTINED)
            if worker.state is not WorkerState.REFUSED:
                self._set_state(worker, WorkerState.FAILED, reason)
            if lost:
                log.warning("worker %s at %s lost: %s", worker.node_id, worker.address, reason)
                self.metrics.emit(NodeFailure(worker.node_id, _failure_kind(reason), reason))
                if self._placement is not None and worker.node_id in self._placement.nodes:
                    self._placement = None
                await self.responses.send(WorkerLost(worker.node_id, worker.address, reason))
                self._replan_soon()
            await trio.sleep(delays[min(failures, len(delays) - 1)])

    def _replan_soon(self) -> None:
        """Re-place the model now that the worker set changed, without waiting for a request:
        the next request finds the new placement ready, and ``cluster()`` never shows none."""
        if self._serving and self._nursery is not None:
            self._nursery.start_soon(self._replan)

    async def _replan(self) -> None:
        try:
            await self.ensure_placement()
        except ButterflyError as exc:  # requests will meet (and report) the same error
            log.warning("re-placement after a change of workers failed: %s", exc)

    async def _connect_and_serve(self, worker: _Worker) -> None:
        net = self.config.network
        async with dial_peer(self.transport, worker.address, net, secret=self.secret) as peer:
            check = Handshake(self._hello(), expect_roles=frozenset({"worker"}))
            hello = await peer.handshake(self._hello(), check, timeout=net.connect_timeout)
            twin = next(
                (
                    w
                    for w in self._workers.values()
                    if w is not worker and w.peer is not None and w.node_id == hello.node_id
                ),
                None,
            )
            if twin is not None:
                # One worker known under two addresses (a proxy, a second interface): one
                # session each would make the planner see two nodes with one id.
                self._set_state(worker, WorkerState.REFUSED, f"the same worker as {twin.address}")
                raise CoordinationError(
                    f"worker {hello.node_id} at {worker.address} is already connected at "
                    f"{twin.address}"
                )
            if self._fingerprint and (hello.fingerprint, hello.model_name) != (
                self._fingerprint,
                self._model,
            ):
                self._set_state(worker, WorkerState.REFUSED, "serves different weights")
                raise FingerprintMismatch(
                    f"worker {hello.node_id} at {worker.address} serves {hello.model_name!r} with "
                    f"fingerprint {hello.fingerprint[:16]}; the cluster serves {self._model!r} with "
                    f"{self._fingerprint[:16]}"
                )
            worker.hello = hello
            worker.peer = peer
            # The worker answers our heartbeats: their pace is ours.
            worker.detector = detector = new_detector(self.config.coordination)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(
                        watch_link,
                        peer,
                        detector,
                        self.config.coordination,
                        label=f"worker {hello.node_id} at {worker.address}",
                        send_heartbeats=True,
                        seq=worker.seq,
                    )
                )
                nursery.start_soon(self._receive_loop, worker, peer)
                worker.link = await self._measure_link(worker, peer)
                self._set_state(worker, WorkerState.READY)
                worker.first_attempt.set()
                for address in hello.peers:
                    self._add_address(address)
                self._replan_soon()

    async def _ping(self, worker: _Worker, peer: Peer, payload: bytes = b"") -> float:
        """Seconds until the worker acknowledges a Probe carrying ``payload``."""
        seq = next(worker.seq)
        answered = worker.acks[seq] = trio.Event()
        start = time.perf_counter()
        await peer.send(Probe(seq=seq, payload=payload))
        with trio.fail_after(self.config.network.connect_timeout):
            await answered.wait()
        return time.perf_counter() - start

    async def _measure_link(self, worker: _Worker, peer: Peer) -> Link:
        """Round trip of small pings, then the time a larger probe adds: latency and bandwidth.

        Links between two workers are measured by the workers themselves (see
        ``WorkerService._introduce``) and arrive in their Acks.
        """
        try:
            return await measure_link(lambda n: self._ping(worker, peer, bytes(n)))
        except trio.TooSlowError:
            raise NetworkError(f"worker at {worker.address} did not answer a link probe") from None

    async def _receive_loop(self, worker: _Worker, peer: Peer) -> None:
        while True:
            message: Message = await peer.receive()
            match message:
                case Ack(seq=seq, peers=peers, links=links, kv_cache_bytes=kv_bytes):
                    self.metrics.emit(CacheReported(worker.node_id, kv_bytes))
                    for address in peers:  # membership gossip: workers that joined later
                        self._add_address(address)
                    for report in links:
                        worker.links_in[report.source] = Link(
                            report.bandwidth_bytes_per_s, report.latency_s
                        )
                    answered = worker.acks.pop(seq, None)
                    if answered is not None:
                        answered.set()
                    elif worker.detector is not None:  # a heartbeat's answer
                        worker.detector.heartbeat(trio.current_time())
                case Assigned(epoch=epoch):
                    event = worker.assigned.get(epoch)
                    if event is not None:
                        event.set()
                case Error(request_id=-1, message=text, kind=kind):
                    log.warning("worker %s reports %s: %s", worker.node_id, kind, text)
                    worker.assign_error = text
                    for event in worker.assigned.values():
                        event.set()
                case Result() | Error() | Checkpoint() | StageOutput():
                    nbytes = _tensor_bytes(message)
                    self.metrics.emit(
                        MessageReceived(worker.node_id, type(message).__name__, nbytes)
                    )
                    if nbytes:
                        self.metrics.emit(BytesTransferred(worker.node_id, "in", nbytes))
                    if isinstance(message, Error | StageOutput):
                        await self.responses.send(Reported(worker.node_id, message))
                    else:
                        await self.responses.send(message)
                case _:
                    log.info("ignoring %s from %s", type(message).__name__, worker.address)

    # -- placement ---------------------------------------------------------------------

    async def ensure_placement(self) -> Placement:
        """The current placement; plans and assigns a new one when a worker joined or left."""
        async with self._placement_lock:
            if self._placement is not None and self._placement_is_live(self._placement):
                return self._placement
            return await self._assign_new_placement()

    def _placement_is_live(self, placement: Placement) -> bool:
        """Still valid: planned over exactly the workers that are ready now (none left, none joined)."""
        return {w.node_id for w in self._ready_workers()} == placement.planned_over

    def _ready_workers(self) -> list[_Worker]:
        return [
            w for w in self._workers.values() if w.state is WorkerState.READY and w.peer is not None
        ]

    def _topology(self, ready: list[_Worker]) -> Topology:
        """Worker-to-worker links as the receiving worker measured them; a pair not measured
        (yet) is estimated from both workers' links to the coordinator: the slower bandwidth
        of the two, and the sum of their one-way latencies."""
        links = []
        for a in ready:
            for b in ready:
                if a is b:
                    continue
                measured = self._measured(a, b)
                if measured is not None:
                    links.append((a.node_id, b.node_id, measured))
                elif a.link is not None and b.link is not None:
                    bandwidth = min(a.link.bandwidth_bytes_per_s, b.link.bandwidth_bytes_per_s)
                    links.append(
                        (a.node_id, b.node_id, Link(bandwidth, a.link.latency_s + b.link.latency_s))
                    )
        return Topology(links=tuple(links))

    def _planning_inputs(
        self, ready: list[_Worker]
    ) -> tuple[list[LayerInfo], list[NodeCapability]]:
        """Layer costs from the first worker that measured them; each worker's speed relative to it."""
        hellos = [w.hello for w in ready if w.hello is not None]
        measured = [h for h in hellos if len(h.layers) == self._num_layers]
        reference = measured[0].layers if measured else ()
        layers = [
            LayerInfo(i, p.compute_ms, p.memory_bytes, p.output_bytes)
            for i, p in enumerate(reference)
        ] or [LayerInfo(i, 1.0, 0, 0) for i in range(self._num_layers)]
        reference_ms = sum(p.compute_ms for p in reference)
        nodes = []
        for hello in hellos:
            own_ms = (
                sum(p.compute_ms for p in hello.layers)
                if len(hello.layers) == self._num_layers
                else 0.0
            )
            power = reference_ms / own_ms if reference_ms > 0 and own_ms > 0 else 1.0
            memory = hello.memory_available or _UNKNOWN_MEMORY
            nodes.append(NodeCapability(hello.node_id, power, memory, hello.address))
        return layers, nodes

    async def _assign_new_placement(self) -> Placement:
        ready = self._ready_workers()
        if not ready:
            raise NetworkError("no worker is ready to take a stage")
        t0 = time.perf_counter()
        layers, nodes = self._planning_inputs(ready)
        cfg = self.config.coordination
        # Replicated stages: plan over groups of 2f + 1 workers, each group as strong as its
        # weakest member; the group's first worker is the stage's first holder.
        groups = replica_groups([w.node_id for w in ready], cfg)
        firsts = {g[0] for g in groups}
        by_id = {n.node_id: n for n in nodes}
        planned = [
            attrs.evolve(
                by_id[g[0]],
                compute_power=min(by_id[m].compute_power for m in g),
                memory_bytes=min(by_id[m].memory_bytes for m in g),
            )
            for g in groups
        ]
        planned_workers = [w for w in ready if w.node_id in firsts]
        self._plan = self.partition.plan(layers, planned, self._topology(planned_workers))
        address = {w.node_id: w.address for w in ready}
        stages = tuple(
            StageSpec(
                index=p.id,
                start=p.layer_range.start,
                stop=p.layer_range.stop,
                node_id=p.assigned_node,
                address=address[p.assigned_node],
            )
            for p in self._plan.partitions
        )
        members = {g[0]: g[1:] for g in groups}
        if cfg.verification == "spot_check":
            # Re-executions run on the next two workers after each stage's own, in order.
            order = [w.node_id for w in ready]
            members = {
                s.node_id: [
                    order[(order.index(s.node_id) + i) % len(order)]
                    for i in (1, 2)
                    if i < len(order)
                ]
                for s in stages
            }
        replicas = tuple(
            msgspec.structs.replace(s, node_id=node, address=address[node])
            for s in stages
            for node in members.get(s.node_id, ())
        )
        planning_s = time.perf_counter() - t0
        self._epoch += 1
        epoch = self._epoch
        phases = self._epoch_phases[epoch] = PhaseTracker("epoch", epoch, self.report_phase)
        phases.advance(Phase.ASSIGNMENT)
        assign = Assign(
            epoch=epoch,
            stages=stages,
            checkpoint_interval=cfg.checkpoint_interval if cfg.verification == "off" else 0.0,
            replicas=replicas,
            agreement=cfg.agreement,
            top_k=cfg.proof_top_k,
        )
        for w in ready:
            w.assigned[epoch] = trio.Event()
            w.assign_error = ""
        sent = trio.current_time()
        try:
            with trio.move_on_after(self.config.api.connect_timeout) as scope:
                for w in ready:
                    assert w.peer is not None
                    await w.peer.send(assign)
                for w in ready:
                    await w.assigned[epoch].wait()
                    if w.assign_error:
                        raise CoordinationError(
                            f"worker {w.node_id} at {w.address} refused placement epoch {epoch}: {w.assign_error}"
                        )
            if scope.cancelled_caught:
                slow = [w.address for w in ready if not w.assigned[epoch].is_set()]
                raise CoordinationError(
                    f"workers {', '.join(slow)} did not accept placement epoch {epoch} within "
                    f"{self.config.api.connect_timeout:g} s"
                )
        except BaseException:
            del self._epoch_phases[epoch]  # never served: nothing to drain or commit
            raise
        finally:
            for w in ready:
                w.assigned.pop(epoch, None)
        self.metrics.emit(
            ConsensusReached(
                epoch, tuple(sorted(w.node_id for w in ready)), trio.current_time() - sent
            )
        )
        phases.advance(Phase.COMPUTATION)
        for old in [
            e for e, t in self._epoch_phases.items() if e != epoch and t.phase is Phase.COMPUTATION
        ]:
            self._epoch_phases[old].advance(Phase.AGGREGATION)  # superseded: its requests drain
            self._commit_if_drained(old)
        self._placement = Placement(
            epoch=epoch,
            stages=stages,
            planned_over=frozenset(w.node_id for w in ready),
            replicas=replicas,
        )
        self.metrics.emit(PlacementChanged(epoch=epoch, stages=len(stages), planning_s=planning_s))
        return self._placement

    # -- quarantine ----------------------------------------------------------------------

    def quarantine(self, node_id: str, evidence: str) -> None:
        """Take a worker caught lying out of every placement until an operator releases it."""
        if node_id in self.quarantined:
            return
        self.quarantined[node_id] = evidence
        log.warning("worker %s quarantined: %s", node_id, evidence)
        self.metrics.emit(NodeFailure(node_id, "byzantine", evidence))
        self.metrics.emit(WorkerQuarantined(node_id, evidence))
        for w in self._workers.values():
            if w.node_id == node_id and w.state is WorkerState.READY:
                self._set_state(w, WorkerState.QUARANTINED)
        self._replan_soon()

    def release(self, node_id: str) -> None:
        """Let a quarantined worker be placed again (an operator checked it)."""
        if not isinstance(node_id, str) or node_id not in self.quarantined:
            held = ", ".join(sorted(self.quarantined)) or "none"
            raise ApiError(f"worker {node_id!r} is not quarantined (quarantined: {held})")
        del self.quarantined[node_id]
        for w in self._workers.values():
            if w.node_id == node_id and w.state is WorkerState.QUARANTINED:
                self._set_state(w, WorkerState.READY if w.peer is not None else WorkerState.FAILED)
        self._replan_soon()

    # -- the narrow interface the scheduler uses ------------------------------------------

    def report_phase(self, scope: str, key: int, phase: Phase) -> None:
        self.metrics.emit(PhaseTransition(scope=scope, key=key, phase=str(phase)))

    def request_started(self, epoch: int) -> None:
        """A request entered the pipeline on placement ``epoch``."""
        self._epoch_requests[epoch] += 1

    def request_finished(self, epoch: int) -> None:
        """A request on placement ``epoch`` left the pipeline (answered, failed or dropped)."""
        self._epoch_requests[epoch] -= 1
        if self._epoch_requests[epoch] <= 0:
            del self._epoch_requests[epoch]
            self._commit_if_drained(epoch)

    def _commit_if_drained(self, epoch: int) -> None:
        tracker = self._epoch_phases.get(epoch)
        if (
            tracker is not None
            and tracker.phase is Phase.AGGREGATION
            and not self._epoch_requests[epoch]
        ):
            tracker.advance(Phase.COMMITMENT)
            del self._epoch_phases[epoch]

    def epoch_phase(self, epoch: int) -> Phase | None:
        """The phase of placement ``epoch``; ``None`` once it is committed (or never existed)."""
        tracker = self._epoch_phases.get(epoch)
        return tracker.phase if tracker is not None else None

    async def send(self, node_id: str, message: Message) -> None:
        """Send ``message`` to the worker ``node_id``; raises ``NetworkError`` if it is not connected."""
        for w in self._workers.values():
            if w.node_id == node_id and w.peer is not None:
                await w.peer.send(message)
                nbytes = _tensor_bytes(message)
                self.metrics.emit(MessageSent(node_id, type(message).__name__, nbytes))
                if nbytes:
                    self.metrics.emit(BytesTransferred(node_id, "out", nbytes))
                return
        raise NetworkError(f"worker {node_id!r} is not connected")

    async def send_all(self, message: Message) -> None:
        """Send ``message`` to every connected worker, all at once: a slow one does not
        hold up the others; those that cannot be reached are skipped."""

        async def send(peer: Peer) -> None:
            with contextlib.suppress(ButterflyError):
                await peer.send(message)

        async with trio.open_nursery() as nursery:
            for w in list(self._workers.values()):
                if w.peer is not None:
                    nursery.start_soon(send, w.peer)

    def cluster(self) -> ClusterInfo:
        placement = self._placement
        return ClusterInfo(
            model=self._model,
            fingerprint=self._fingerprint,
            num_layers=self._num_layers,
            epoch=placement.epoch if placement else 0,
            workers=tuple(
                WorkerInfo(
                    node_id=w.node_id,
                    address=w.address,
                    state=w.state,
                    reason=w.reason,
                    link=w.link,
                )
                for w in self._workers.values()
            ),
            stages=tuple(
                StageInfo(
                    index=s.index,
                    layers=range(s.start, s.stop),
                    node_id=s.node_id,
                    address=s.address,
                )
                for s in (placement.stages if placement else ())
            ),
            replicas=tuple(
                StageInfo(
                    index=s.index,
                    layers=range(s.start, s.stop),
                    node_id=s.node_id,
                    address=s.address,
                )
                for s in (placement.replicas if placement else ())
            ),
            input_spec=self.input_spec,
            strategy=self._plan.strategy if self._plan else "",
            quality=self._plan.quality if self._plan else None,
            idle=self._plan.idle if self._plan else (),
            worker_links=self._measured_links(),
        )

    @staticmethod
    def _measured(source: _Worker, target: _Worker) -> Link | None:
        """The link ``target`` measured from ``source``. Reports name the source by the
        address it advertises, which may differ from the one this coordinator dialled
        (``localhost`` vs ``127.0.0.1``, a NAT): both are tried."""
        link = target.links_in.get(source.address)
        if link is None and source.hello is not None:
            link = target.links_in.get(source.hello.address)
        return link

    def _measured_links(self) -> tuple[tuple[str, str, Link], ...]:
        ready = [w for w in self._workers.values() if w.state is WorkerState.READY]
        return tuple(
            (a.node_id, b.node_id, link)
            for a in ready
            for b in ready
            if a is not b and (link := self._measured(a, b)) is not None
        )


def replica_groups(ready: list[str], cfg: CoordinationConfig) -> list[list[str]]:
    """The workers (ready, in discovery order) in groups whose members hold the same
    stages: groups of ``2f + 1`` under ``replicate`` (the spare ones idle; a single group
    of ``f + 1`` or more when fewer remain, which detects a liar but cannot outvote it),
    every worker alone otherwise."""
    if cfg.verification != "replicate":
        if cfg.verification == "spot_check" and len(ready) < 2:
            raise PartitionError(
                f"coordination.verification = 'spot_check' needs at least 2 workers not "
                f"quarantined (3 to tell which one lied); {len(ready)} ready"
            )
        return [[node] for node in ready]
    f = cfg.max_byzantine
    size = 2 * f + 1
    if len(ready) < f + 1:
        raise PartitionError(
            f"coordination.verification = 'replicate' with max_byzantine = {f} needs at least "
            f"{size} workers not quarantined ({f + 1} to detect a liar without outvoting it); "
            f"{len(ready)} ready"
        )
    if len(ready) < size:
        return [list(ready)]
    return [ready[i : i + size] for i in range(0, len(ready) - size + 1, size)]


def error_from_wire(error: Error) -> ButterflyError:
    """Rebuild the exception a worker reported (unknown kinds become ``ComputeError``)."""
    return ERROR_KINDS.get(error.kind, ERROR_KINDS["compute"])(error.message)


def _tensor_bytes(message: Message) -> int:
    """Tensor bytes a message carries (0 for control messages)."""
    tensor = getattr(message, "tensor", None)
    return tensor.data.nbytes if tensor is not None else 0


def _failure_kind(reason: str) -> str:
    """What kind of failure a lost worker's reason describes, for a metric label."""
    if "suspected" in reason:
        return "suspected"
    if "authenticat" in reason or "secret" in reason:
        return "authentication"
    return "disconnected"
