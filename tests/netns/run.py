"""Cut a stage's worker off the network while requests flow: none may be lost (needs root).

    sudo .venv/bin/python -m tests.netns.run --workers 3 --requests 800 --seed 1
    sudo nox -s netns -- --seed 2

Each worker runs in its own network namespace (see ``tests/netns/network.py``); this
process, the coordinator, stays in the root namespace and sends paced requests from a
few threads, comparing every output bitwise with a local forward. After some requests it
takes down the bridge port of one worker that holds a stage (chosen by ``--seed``): the
process lives on with its sockets open, so only the heartbeat failure detector can
notice. Every request must still complete, with the right output. Then (unless
``--no-rejoin``) the port comes back up and the worker must be placed and used again.

Prints a timeline (cut, detection, new placement, first answer from it), the latencies
around the cut, and the totals; exits 1 if any request failed, was wrong or never
returned, or if recovery or the rejoin was not seen; 2 if the drill could not run.
Everything is bounded: each request by ``--request-timeout``, the whole drill by
``--timeout``. Namespaces, links and worker processes are removed on every exit path,
and the leftovers of a crashed earlier run are removed first.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import logging
import math
import os
import random
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import torch

from butterfly import Butterfly, ButterflyError, ClusterInfo, WorkerState
from butterfly._local import WorkerProcess, model_import_path
from butterfly.protocol import InputSpec

from .network import Network, NetworkSetupError

PROG = "python -m tests.netns.run"
log = logging.getLogger("netns")


class DrillTimeout(Exception):
    """The whole drill ran past ``--timeout``."""


class _SinceStart(logging.Formatter):
    """Log times in seconds since the drill started: the clock of its timeline."""

    def __init__(self, origin: float) -> None:
        super().__init__("t=%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.origin = origin

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{record.created - self.origin:6.2f} s"


class NamespacedWorker(WorkerProcess):
    """``ip netns exec NS python -m butterfly.worker ARGS``: a worker inside a network namespace.

    ``ip netns exec`` execs the command, so the pid (and every signal) is the worker's own.
    """

    def __init__(self, namespace: str, args: Sequence[str]) -> None:
        self.namespace = namespace
        super().__init__(args, launcher=("ip", "netns", "exec", namespace))


def start_workers(
    net: Network, *, model: str, port: int, config: Path, startup_timeout: float
) -> list[NamespacedWorker]:
    """The first worker alone, then the others naming it in ``--peers`` (as ``LocalCluster`` does)."""
    common = ["--model", model, "--threads", "1", "--config", str(config)]

    def spawn(i: int, peers: Sequence[str]) -> NamespacedWorker:
        args = ["--listen", f"{net.address(i)}:{port}", "--node-id", f"w{i}", *common]
        if peers:
            args += ["--peers", ",".join(peers)]
        return NamespacedWorker(net.namespace(i), args)

    workers = [spawn(0, ())]
    try:
        first = workers[0].wait_ready(startup_timeout)
        workers += [spawn(i, [first]) for i in range(1, net.workers)]
        for w in workers[1:]:
            w.wait_ready(startup_timeout)
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def stop_workers(workers: Sequence[WorkerProcess]) -> None:
    for w in workers:
        w.terminate()
    for w in workers:
        w.stop(timeout=5.0)


def load_factory(path: str) -> Callable[[], torch.nn.Module]:
    """The model factory behind ``package.module:callable``, to compute the reference here."""
    module, _, name = model_import_path(path).partition(":")
    factory: Callable[[], torch.nn.Module] = getattr(importlib.import_module(module), name)
    return factory


def make_inputs(spec: InputSpec, count: int, rng: random.Random, seed: int) -> list[torch.Tensor]:
    """``count`` inputs of 1 to 4 rows that the first stage accepts (8 for unnamed sizes)."""
    gen = torch.Generator().manual_seed(seed)
    middle = [8] * max(spec.min_ndim - 1 - len(spec.trailing), 0)
    trailing = list(spec.trailing) or [64]
    dtype = getattr(torch, spec.dtype) if spec.dtype else torch.float32
    return [
        torch.randn(rng.randint(1, 4), *middle, *trailing, generator=gen).to(dtype)
        for _ in range(count)
    ]


def local_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference: one torch thread like each worker, inference mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            y: torch.Tensor = model(x)
            return y
    finally:
        torch.set_num_threads(threads)


# -- traffic -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One request as the caller saw it; times in seconds since the traffic started."""

    index: int
    submitted: float
    done: float
    #: The cluster's placement epoch just after the answer came back.
    epoch: int
    error: str = ""
    correct: bool = False

    @property
    def latency_ms(self) -> float:
        return (self.done - self.submitted) * 1000


class Traffic:
    """``requests`` requests paced at ``rate`` per second, from ``concurrency`` threads.

    A thread whose request hangs holds up only itself; the others keep to the schedule
    until every thread waits, which bounds the requests in flight.
    """

    def __init__(
        self,
        client: Butterfly,
        inputs: Sequence[torch.Tensor],
        expected: Sequence[torch.Tensor],
        *,
        requests: int,
        rate: float,
        concurrency: int,
        request_timeout: float,
        origin: float,
    ) -> None:
        self.client = client
        self.origin = origin
        self.inputs = inputs
        self.expected = expected
        self.requests = requests
        self.rate = rate
        self.request_timeout = request_timeout
        self.outcomes: list[Outcome] = []
        self.submitted = 0
        self._next = 0
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, name=f"traffic-{n}", daemon=True)
            for n in range(concurrency)
        ]
        self.t0 = 0.0

    def now(self) -> float:
        """Seconds since ``origin`` (the drill's start): the clock of the timeline."""
        return time.monotonic() - self.origin

    def start(self) -> None:
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        """Wait for every thread; ``False`` if some still wait after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0))
        return not any(t.is_alive() for t in self._threads)

    def wait_until(self, predicate: Callable[[list[Outcome]], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self.outcomes), timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._changed:
                i = self._next
                if i >= self.requests:
                    return
                self._next += 1
            if self._stop.wait(max(self.t0 + i / self.rate - time.monotonic(), 0)):
                return
            k = i % len(self.inputs)
            with self._changed:
                self.submitted += 1
            submitted = self.now()
            error, correct = "", False
            try:
                y = self.client.infer(self.inputs[k], timeout=self.request_timeout)
                correct = torch.equal(y, self.expected[k])
            except Exception as exc:  # every failure is a finding, whatever its type
                error = f"{type(exc).__name__}: {exc}"
            done = self.now()
            try:
                epoch = self.client.cluster().epoch
            except Exception:
                epoch = -1
            with self._changed:
                self.outcomes.append(Outcome(i, submitted, done, epoch, error, correct))
                self._changed.notify_all()


class ClusterWatch:
    """Polls ``client.cluster()`` and notes when each named condition first held."""

    def __init__(self, client: Butterfly, clock: Callable[[], float]) -> None:
        self.client = client
        self.clock = clock
        self.seen: dict[str, float] = {}
        self.last: ClusterInfo | None = None

    def until(self, conditions: dict[str, Callable[[ClusterInfo], bool]], timeout: float) -> bool:
        """Poll until every condition has held once; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.client.cluster()
            self.last = info
            now = self.clock()
            for name, holds in conditions.items():
                if name not in self.seen and holds(info):
                    self.seen[name] = now
                    log.info("%s (epoch %d)", name, info.epoch)
            if all(name in self.seen for name in conditions):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def state_of(info: ClusterInfo, node_id: str) -> WorkerState | None:
    return next((w.state for w in info.workers if w.node_id == node_id), None)


def stage_nodes(info: ClusterInfo) -> list[str]:
    return [s.node_id for s in info.stages]


def describe_placement(info: ClusterInfo) -> str:
    return ", ".join(
        f"stage {s.index} layers {s.layers.start}..{s.layers.stop - 1} on {s.node_id}"
        for s in info.stages
    )


# -- the drill -----------------------------------------------------------------------------


@dataclasses.dataclass
class Findings:
    """What the drill printed as it went, and what went wrong."""

    problems: list[str] = dataclasses.field(default_factory=list)

    def say(self, line: str) -> None:
        print(line, flush=True)

    def fail(self, problem: str) -> None:
        self.problems.append(problem)
        print(f"PROBLEM: {problem}", flush=True)


def first_done_after(
    outcomes: Sequence[Outcome], t: float, epoch: Callable[[int], bool]
) -> Outcome | None:
    matching = [o for o in outcomes if o.done >= t and not o.error and epoch(o.epoch)]
    return min(matching, key=lambda o: o.done, default=None)


def latency_summary(outcomes: Sequence[Outcome]) -> str:
    if not outcomes:
        return "none"
    lat = sorted(o.latency_ms for o in outcomes)
    return (
        f"{len(lat)} requests, p50 {statistics.median(lat):.1f} ms, "
        f"p99 {lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.1f} ms, max {lat[-1]:.1f} ms"
    )


def longest_gap(outcomes: Sequence[Outcome], start: float, stop: float) -> tuple[float, float]:
    """The longest time without any answer in ``[start, stop]``: (length, its start)."""
    times = [start, *sorted(o.done for o in outcomes if start <= o.done <= stop), stop]
    return max(((b - a, a) for a, b in itertools.pairwise(times)), default=(0.0, start))


def drill(
    b: Butterfly,
    net: Network,
    workers: Sequence[NamespacedWorker],
    args: argparse.Namespace,
    findings: Findings,
    origin: float,
) -> None:
    rng = random.Random(args.seed)
    info = b.cluster()
    inputs = make_inputs(info.input_spec, args.inputs, rng, args.seed)
    model = load_factory(args.model)()
    expected = [local_forward(model, x) for x in inputs]
    epoch0 = info.epoch
    findings.say(f"placement epoch {epoch0}: {describe_placement(info)}")
    holders = stage_nodes(info)
    victim_id = rng.choice(holders)
    victim = next(i for i, w in enumerate(workers) if w.node_id == victim_id)
    cut_after = rng.randrange(args.requests // 5, args.requests // 3 + 1)

    traffic = Traffic(
        b,
        inputs,
        expected,
        requests=args.requests,
        rate=args.rate,
        concurrency=args.concurrency,
        request_timeout=args.request_timeout,
        origin=origin,
    )
    watch = ClusterWatch(b, traffic.now)
    t_cut = t_recovered = math.inf
    t_up: float | None = None
    traffic.start()
    try:
        if not traffic.wait_until(
            lambda o: len(o) >= cut_after, args.request_timeout + cut_after / args.rate
        ):
            findings.fail(
                f"only {len(traffic.outcomes)} of the first {cut_after} requests answered before the cut"
            )
            return
        t_cut = traffic.now()
        net.cut(victim)
        findings.say(
            f"t={t_cut:6.2f} s  cut: {net.host_end(victim)} down, isolating {victim_id} "
            f"({workers[victim].address}, stage {holders.index(victim_id)}) after {cut_after} answers"
        )
        recovered = watch.until(
            {
                "suspected": lambda c: state_of(c, victim_id) is not WorkerState.READY,
                "re-placed": lambda c: (
                    c.epoch > epoch0 and bool(c.stages) and victim_id not in stage_nodes(c)
                ),
            },
            args.recovery_timeout,
        )
        assert watch.last is not None
        epoch1 = watch.last.epoch
        if not recovered:
            findings.fail(
                f"{victim_id} was not dropped from the placement within {args.recovery_timeout:g} s "
                f"of the cut (seen: {watch.seen})"
            )
        else:
            findings.say(
                f"t={watch.seen['suspected']:6.2f} s  {victim_id} suspected: "
                f"+{watch.seen['suspected'] - t_cut:.2f} s after the cut"
            )
            findings.say(
                f"t={watch.seen['re-placed']:6.2f} s  epoch {epoch1}: {describe_placement(watch.last)} "
                f"(+{watch.seen['re-placed'] - t_cut:.2f} s)"
            )
        traffic.wait_until(
            lambda o: first_done_after(o, t_cut, lambda e: e > epoch0) is not None,
            args.recovery_timeout,
        )
        first_new = first_done_after(traffic.outcomes, t_cut, lambda e: e > epoch0)
        if first_new is None:
            findings.fail(
                f"no request completed on a new placement within {args.recovery_timeout:g} s of the cut"
            )
            t_recovered = traffic.now()
        else:
            t_recovered = first_new.done
            findings.say(
                f"t={t_recovered:6.2f} s  first answer from the new placement: request "
                f"{first_new.index}, RECOVERY {t_recovered - t_cut:.2f} s after the cut"
            )

        if args.rejoin and first_new is not None:
            # Leave the survivors serving alone for a while, then bring the port back.
            rejoin_after = min(
                len(traffic.outcomes) + int(args.rate * args.cut_for),
                args.requests - int(args.rate * 6),
            )
            traffic.wait_until(
                lambda o: len(o) >= rejoin_after, args.request_timeout + args.cut_for
            )
            t_up = traffic.now()
            net.restore(victim)
            findings.say(
                f"t={t_up:6.2f} s  {net.host_end(victim)} up again ({t_up - t_cut:.1f} s cut off)"
            )
            ok = watch.until(
                {
                    "ready again": lambda c: state_of(c, victim_id) is WorkerState.READY,
                    "placed again": lambda c: victim_id in stage_nodes(c),
                },
                args.recovery_timeout,
            )
            if not ok:
                # Placement is planned when a request needs it: no traffic left, no new plan.
                hint = (
                    "; the traffic had ended (placement waits for a request): raise --requests"
                    if len(traffic.outcomes) >= args.requests
                    else ""
                )
                findings.fail(
                    f"{victim_id} was not placed again within {args.recovery_timeout:g} s of its link "
                    f"coming back (seen: {watch.seen}){hint}"
                )
            else:
                assert watch.last is not None
                rejoin_epoch = watch.last.epoch
                findings.say(
                    f"t={watch.seen['ready again']:6.2f} s  {victim_id} ready again "
                    f"(+{watch.seen['ready again'] - t_up:.2f} s after the link came up)"
                )
                findings.say(
                    f"t={watch.seen['placed again']:6.2f} s  epoch {rejoin_epoch}: "
                    f"{describe_placement(watch.last)} (+{watch.seen['placed again'] - t_up:.2f} s)"
                )
                epoch_r = rejoin_epoch
                traffic.wait_until(
                    lambda o: first_done_after(o, t_up, lambda e: e >= epoch_r) is not None,
                    args.recovery_timeout,
                )
                first_back = first_done_after(traffic.outcomes, t_up, lambda e: e >= epoch_r)
                if first_back is None:
                    findings.fail(f"no request completed on the placement with {victim_id} back")
                else:
                    findings.say(
                        f"t={first_back.done:6.2f} s  first answer with {victim_id} back: request "
                        f"{first_back.index}, REJOIN {first_back.done - t_up:.2f} s after the link came up"
                    )

        if not traffic.join(args.requests / args.rate + args.request_timeout + 5):
            findings.fail("some requests never returned (their threads still wait)")
    except Exception as exc:  # whatever the library raised is the finding
        # The client itself broke (e.g. its background thread died): say so, then report
        # what the callers saw, which holds the cause.
        findings.fail(f"the client failed at t={traffic.now():.2f} s: {type(exc).__name__}: {exc}")
        traffic.stop()
        traffic.join(args.request_timeout)
    finally:
        traffic.stop()

    outcomes = sorted(traffic.outcomes, key=lambda o: o.index)
    failed = sorted((o for o in outcomes if o.error), key=lambda o: o.done)
    wrong = [o for o in outcomes if not o.error and not o.correct]
    lost = traffic.submitted - len(outcomes)
    findings.say(
        f"requests: submitted {traffic.submitted}/{args.requests}, completed "
        f"{len(outcomes) - len(failed)}, failed {len(failed)}, wrong {len(wrong)}, lost {lost}"
    )
    for o in failed[:10]:
        findings.say(f"  request {o.index} failed after {o.latency_ms:.0f} ms: {o.error}")
    for o in wrong[:10]:
        findings.say(f"  request {o.index} answered a different output (epoch {o.epoch})")
    if failed or wrong or lost or traffic.submitted != args.requests:
        findings.fail(
            f"{len(failed)} failed, {len(wrong)} wrong, {lost} lost, "
            f"{args.requests - traffic.submitted} never submitted"
        )

    before = [o for o in outcomes if o.done < t_cut]
    hit = [o for o in outcomes if o.submitted < t_recovered and o.done >= t_cut]
    after = [o for o in outcomes if o.submitted >= t_recovered and (t_up is None or o.done < t_up)]
    findings.say(f"latency before the cut:  {latency_summary(before)}")
    findings.say(f"latency across the cut:  {latency_summary(hit)}")
    findings.say(f"latency after recovery:  {latency_summary(after)}")
    if math.isfinite(t_cut):
        answered = [o for o in outcomes if not o.error]
        end = t_recovered + 1.0 if math.isfinite(t_recovered) else traffic.now()
        gap, gap_at = longest_gap(answered, t_cut, end)
        findings.say(
            f"longest time without an answer after the cut: {gap:.2f} s (from t={gap_at:.2f} s)"
        )
    for o in hit[:12]:
        findings.say(
            f"  request {o.index:4d}: sent t={o.submitted:6.2f}, answered t={o.done:6.2f}, "
            f"{o.latency_ms:7.1f} ms, epoch {o.epoch}"
        )
    if len(hit) > 12:
        findings.say(f"  ... {len(hit) - 12} more")
    if t_up is not None:
        around = [o for o in outcomes if o.done >= t_up]
        findings.say(f"latency after the link came up: {latency_summary(around)}")
        slow = [
            o
            for o in around
            if o.latency_ms
            > 20 * max(statistics.median([x.latency_ms for x in before] or [1.0]), 1.0)
        ]
        for o in slow[:8]:
            findings.say(
                f"  slow request {o.index:4d}: sent t={o.submitted:6.2f}, answered t={o.done:6.2f}, "
                f"{o.latency_ms:7.1f} ms, epoch {o.epoch}"
            )
    try:
        metrics = b.metrics()
    except ButterflyError as exc:
        findings.say(f"coordinator metrics unavailable: {exc}")
        return
    findings.say(
        f"coordinator metrics: completed {metrics.requests_completed}, failed "
        f"{metrics.requests_failed}, retried {metrics.requests_retried}, "
        f"placements {metrics.placements}"
    )


# -- command line ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=3, help="worker namespaces (default 3)")
    p.add_argument("--requests", type=int, default=800, help="requests in all (default 800)")
    p.add_argument(
        "--seed", type=int, default=1, help="picks the inputs, the victim and when to cut"
    )
    p.add_argument("--rate", type=float, default=40.0, help="requests per second (default 40)")
    p.add_argument("--concurrency", type=int, default=4, help="caller threads (default 4)")
    p.add_argument(
        "--inputs", type=int, default=32, help="distinct inputs, reused in turn (default 32)"
    )
    p.add_argument(
        "--model",
        default="butterfly.model.zoo:mlp",
        help="deterministic model factory, e.g. butterfly.model.zoo:small_transformer or "
        "tests.models:sleepy (default butterfly.model.zoo:mlp)",
    )
    p.add_argument("--port", type=int, default=7070, help="port every worker listens on")
    p.add_argument(
        "--strategy",
        default="uniform",
        help="partition.default_strategy (default uniform: every worker holds a stage)",
    )
    p.add_argument(
        "--heartbeat", type=float, default=0.25, help="coordination.heartbeat_interval, s"
    )
    p.add_argument(
        "--pause", type=float, default=1.0, help="coordination.acceptable_heartbeat_pause, s"
    )
    p.add_argument("--phi", type=float, default=8.0, help="coordination.phi_threshold")
    p.add_argument(
        "--connect-timeout", type=float, default=3.0, help="network.connect_timeout, s (default 3)"
    )
    p.add_argument(
        "--reconnect-max-delay",
        type=float,
        default=1.0,
        help="network.reconnect_max_delay, s (default 1)",
    )
    p.add_argument("--request-timeout", type=float, default=30.0, help="per request, s")
    p.add_argument(
        "--recovery-timeout", type=float, default=20.0, help="to see each recovery step, s"
    )
    p.add_argument(
        "--cut-for",
        type=float,
        default=5.0,
        help="seconds of traffic on the survivors before the link comes back",
    )
    p.add_argument("--no-rejoin", dest="rejoin", action="store_false", help="leave the link down")
    p.add_argument("--timeout", type=int, default=240, help="the whole drill, s (default 240)")
    p.add_argument("--verbose", action="store_true", help="the library's INFO logs (retries, ...)")
    return p


CONFIG = """\
[api]
request_timeout = {request_timeout}
connect_timeout = 60.0
drain_timeout = 2.0
[partition]
default_strategy = "{strategy}"
[coordination]
heartbeat_interval = {heartbeat}
acceptable_heartbeat_pause = {pause}
phi_threshold = {phi}
[network]
# Short, so that dials to the cut-off worker give up and retry quickly once it is back.
connect_timeout = {connect_timeout}
reconnect_max_delay = {reconnect_max_delay}
# The workers listen beyond loopback: they refuse to start without a shared secret.
secret_file = "{secret_file}"
"""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print(
            f"{PROG}: needs root (it creates network namespaces, veth pairs and a bridge)",
            file=sys.stderr,
        )
        return 2
    if shutil.which("ip") is None:
        print(f"{PROG}: the 'ip' command (iproute2) is not installed", file=sys.stderr)
        return 2
    if args.requests < 50 or args.rate <= 0 or args.concurrency < 1 or args.workers < 2:
        print(
            f"{PROG}: need --requests >= 50, --rate > 0, --concurrency >= 1, --workers >= 2",
            file=sys.stderr,
        )
        return 2
    try:
        load_factory(args.model)
    except (ButterflyError, ImportError, AttributeError) as exc:
        print(f"{PROG}: --model {args.model!r}: {exc}", file=sys.stderr)
        return 2
    start = time.monotonic()
    handler = logging.StreamHandler()
    handler.setFormatter(_SinceStart(time.time()))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    if args.verbose:
        logging.getLogger("butterfly").setLevel(logging.INFO)
        log.setLevel(logging.INFO)

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise DrillTimeout(f"the drill ran past --timeout {args.timeout} s")

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)

    net = Network(args.workers)
    # Only one drill can run at a time (the names are fixed): older config dirs are leftovers.
    for stale in Path(tempfile.gettempdir()).glob("butterfly-netns-*"):
        shutil.rmtree(stale, ignore_errors=True)
    leftovers = net.destroy()
    if leftovers:
        print(
            f"{PROG}: cannot remove the leftovers of an earlier run: {'; '.join(leftovers)}",
            file=sys.stderr,
        )
        return 2
    findings = Findings()
    workers: list[NamespacedWorker] = []
    tmp = Path(tempfile.mkdtemp(prefix="butterfly-netns-"))
    code = 2
    signal.alarm(args.timeout)
    try:
        secret_file = tmp / "secret"
        secret_file.write_text(secrets.token_hex(32))
        secret_file.chmod(0o600)
        config = tmp / "butterfly.toml"
        config.write_text(CONFIG.format(**vars(args), secret_file=secret_file), encoding="utf-8")
        net.create()
        print(
            f"{args.workers} workers in namespaces {net.namespace(0)}..{net.namespace(args.workers - 1)} "
            f"({net.address(0)}..{net.address(args.workers - 1)}), bridge bfly-br0; seed {args.seed}",
            flush=True,
        )
        workers = start_workers(
            net, model=args.model, port=args.port, config=config, startup_timeout=120
        )
        print(
            f"workers ready after {time.monotonic() - start:.1f} s: {', '.join(w.address for w in workers)}",
            flush=True,
        )
        with Butterfly.connect([w.address for w in workers], config=config, timeout=60) as b:
            drill(b, net, workers, args, findings, start)
        code = 1 if findings.problems else 0
    except DrillTimeout as exc:
        findings.fail(str(exc))
        code = 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; cleaning up", file=sys.stderr)
        code = 130
    except (NetworkSetupError, ButterflyError, OSError) as exc:
        print(f"{PROG}: cannot set up the drill: {exc}", file=sys.stderr)
        code = 2
    finally:
        signal.alarm(0)
        # A second Ctrl-C must not leave namespaces behind.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            stop_workers(workers)
            if code != 0:
                for w in workers:
                    print(
                        f"log of {w.node_id or w.namespace} ({w.log.name}): {w.log_tail(8)}",
                        file=sys.stderr,
                    )
            else:
                for w in workers:
                    Path(w.log.name).unlink(missing_ok=True)
            problems = net.destroy()
            shutil.rmtree(tmp, ignore_errors=True)
            if problems:
                print(f"{PROG}: cleanup left: {'; '.join(problems)}", file=sys.stderr)
                code = code or 1
        finally:
            signal.signal(signal.SIGINT, previous)
    print(f"{'PASS' if code == 0 else 'FAIL'} ({time.monotonic() - start:.1f} s)", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
