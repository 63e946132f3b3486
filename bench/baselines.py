"""Reference throughputs: what Butterfly's pipeline benchmark is compared against.

Both baselines run the reference workload of DESIGN.md ("Reference workload for
benchmarks"): ``reference_transformer()`` (12 × ``nn.TransformerEncoderLayer``, d_model
768, eval mode, seed 0) on requests of shape ``(1, 128, 768)`` float32, drawn from a
generator seeded with 0. The figure of both is **requests per second**.

1. **Local**: one process, one torch thread, forwarding one request at a time under
   ``torch.inference_mode()``. The throughput of the model with no pipeline at all, and so
   the denominator of every speed-up the pipeline claims.

2. **GPipe**: ``torch.distributed.pipelining`` with ``ScheduleGPipe`` on the gloo
   backend, 2 ranks × 1 torch thread, the model split at layer 6 (rank 0 holds layers
   0–5, rank 1 layers 6–11), 8 micro-batches of one request per step, forward only (no
   loss function, so the schedule never runs a backward; steps run under
   ``torch.no_grad()``). The throughput the stock PyTorch pipeline reaches on the same
   two cores: what Butterfly's pipeline should match. Timed end to end, from a point
   where both ranks are ready to the last output of the last step on the last rank, so
   one pipeline fill is inside the figure; each GPipe step drains, which costs a bubble
   of up to one stage-time per step, partly hidden because rank 0 may start the next step
   while rank 1 still finishes the previous one.

DESIGN.md expects GPipe/local ≈ 1.7 on a 2-core machine; the physical limit is 2.0
(two cores, each busy all the time).

Every measurement runs in freshly spawned processes: thread settings (``torch.set_num_threads``)
do not leak into the caller or between measurements, no previous measurement's allocator
state or warmed caches are inherited, and a process group is created and destroyed per
measurement. Each process warms up untimed before it measures, every loop is bounded,
and every measurement has a deadline after which its processes are killed.

The machine is measured too: for each measurement, the CPU time that other processes
(and the hypervisor, as steal time) took meanwhile, in cores. GPipe needs both cores, so
a busy neighbour costs it far more than the one-core local baseline and the ratio
collapses; the report warns when that figure exceeds ``CONTENTION_LIMIT``.

Run it as ``python -m bench.baselines [--runs N] [--quick] [--json PATH]``; runs of the two
baselines are interleaved so that machine drift affects both alike.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from butterfly.model.zoo import reference_transformer

from .transport import Summary

if TYPE_CHECKING:  # torch.distributed re-exports it without marking it as public for mypy
    from torch._C._distributed_c10d import TCPStore

LOOPBACK = "127.0.0.1"
REQUEST_SHAPE = (1, 128, 768)  # one request of the reference workload
INPUT_SEED = 0
STAGES = 2  # GPipe ranks: one per core of the reference machine
DESIGN_RATIO = 1.7  # GPipe/local expected by DESIGN.md
PHYSICAL_LIMIT = 2.0  # two cores
# Seconds a measurement may take beyond its timed loop: spawning python, importing
# torch, building the model, the gloo rendezvous and the warm-up.
STARTUP_ALLOWANCE_S = 120.0
# Seconds a process may take to exit once it has sent its result (destroying the
# process group included) before it is killed.
EXIT_GRACE_S = 30.0
MAX_ITERATIONS = 100_000  # bound of every timed loop, whatever the duration asks for
# Cores' worth of CPU that other processes (or the hypervisor: steal time) may take during
# a measurement before the report calls its figures unreliable.
CONTENTION_LIMIT = 0.1


# -- the workload ------------------------------------------------------------------------


def reference_input(requests: int = 1) -> torch.Tensor:
    """``requests`` reference requests stacked on dim 0: ``(requests, 128, 768)`` float32.

    Drawn from a generator seeded with ``INPUT_SEED``, so request 0 is the same tensor
    whatever ``requests`` is (the local baseline's input is GPipe's first micro-batch).
    """
    generator = torch.Generator().manual_seed(INPUT_SEED)
    return torch.randn((requests, *REQUEST_SHAPE[1:]), generator=generator)


def default_timeout(duration_s: float) -> float:
    """Deadline of a measurement whose timed loop lasts about ``duration_s``."""
    return STARTUP_ALLOWANCE_S + 3 * duration_s


def _iterations(duration_s: float, seconds_each: float) -> int:
    """How many iterations of ``seconds_each`` fill ``duration_s``: at least 1, bounded."""
    if seconds_each <= 0:
        return MAX_ITERATIONS
    return max(1, min(MAX_ITERATIONS, math.ceil(duration_s / seconds_each)))


# -- isolated processes ------------------------------------------------------------------

Job = TypeVar("Job")


def _child_main(conn: Connection, fn: Callable[[Job], float], job: Job) -> None:
    """Body of a spawned process: run ``fn(job)``, send ``("ok", result)`` or ``("error", tb)``."""
    try:
        conn.send(("ok", fn(job)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))  # relayed: the caller raises it
    finally:
        conn.close()


def _collect(conns: Sequence[Connection], timeout_s: float) -> list[float]:
    """The results sent on ``conns``, in order; fails on the first error, death or the deadline."""
    deadline = time.monotonic() + timeout_s
    index = {id(conn): i for i, conn in enumerate(conns)}
    results: dict[int, float] = {}
    pending = list(conns)
    while pending:
        remaining = deadline - time.monotonic()
        ready = wait(pending, timeout=max(0.0, remaining)) if remaining > 0 else []
        if not ready:
            missing = sorted(index[id(c)] for c in pending)
            raise TimeoutError(f"processes {missing} sent no result within {timeout_s:.0f} s")
        for conn in ready:
            assert isinstance(conn, Connection)
            i = index[id(conn)]
            try:
                status, value = conn.recv()
            except EOFError:
                raise RuntimeError(f"process {i} exited without sending a result") from None
            if status != "ok":
                raise RuntimeError(f"process {i} failed:\n{value}")
            results[i] = float(value)
            pending.remove(conn)
    return [results[i] for i in range(len(conns))]


def run_isolated(fn: Callable[[Job], float], jobs: Sequence[Job], timeout_s: float) -> list[float]:
    """``[fn(job) for job in jobs]``, each call in its own freshly spawned python process.

    The processes run concurrently (the GPipe ranks need each other). ``fn`` must be a
    module-level function and the jobs picklable. Raises if any process fails, dies or
    has not answered within ``timeout_s``; in every case all processes are gone on return
    (those still running after ``EXIT_GRACE_S``, or at once on failure, are killed).
    """
    context = multiprocessing.get_context("spawn")
    processes: list[multiprocessing.process.BaseProcess] = []
    conns: list[Connection] = []
    succeeded = False
    try:
        for job in jobs:
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=_child_main, args=(sender, fn, job), daemon=True)
            process.start()
            sender.close()  # ours: so that a dead child reads as EOF, not silence
            processes.append(process)
            conns.append(receiver)
        results = _collect(conns, timeout_s)
        succeeded = True
        return results
    finally:
        grace_deadline = time.monotonic() + (EXIT_GRACE_S if succeeded else 0.0)
        for started in processes:
            started.join(max(0.0, grace_deadline - time.monotonic()))
            if started.is_alive():
                started.kill()
                started.join()
        for conn in conns:
            conn.close()


# -- baseline 1: local forward, one thread -----------------------------------------------


@dataclass(frozen=True)
class LocalJob:
    """What the local process measures: see :func:`local_throughput`."""

    duration_s: float
    threads: int
    warmup: int


def _measure_local(job: LocalJob) -> float:
    """In the spawned process: requests/s of one-request forwards, after ``job.warmup`` of them."""
    torch.set_num_threads(job.threads)
    model = reference_transformer()
    request = reference_input()
    with torch.inference_mode():
        for _ in range(job.warmup):
            model(request)
        count = 0
        start = time.perf_counter()
        elapsed = 0.0
        while elapsed < job.duration_s and count < MAX_ITERATIONS:
            model(request)
            count += 1
            elapsed = time.perf_counter() - start
    return count / elapsed


def local_throughput(
    duration_s: float, *, threads: int = 1, warmup: int = 2, timeout_s: float | None = None
) -> float:
    """Requests/s of a local, single-process forward of the reference model.

    Measured in a freshly spawned process with ``torch.set_num_threads(threads)``: after
    ``warmup`` untimed forwards, one ``(1, 128, 768)`` request is forwarded under
    ``torch.inference_mode()`` again and again for about ``duration_s`` seconds (whole
    forwards only: the loop stops at the first one that ends past ``duration_s``).

    With the default single thread this is the denominator of every pipeline speed-up:
    one core doing the whole model (≈ 310 ms a request on the reference machine).
    """
    job = LocalJob(duration_s=duration_s, threads=threads, warmup=warmup)
    timeout = default_timeout(duration_s) if timeout_s is None else timeout_s
    (rate,) = run_isolated(_measure_local, [job], timeout)
    return rate


# -- baseline 2: torch.distributed.pipelining, ScheduleGPipe -----------------------------


@dataclass(frozen=True)
class GPipeJob:
    """What one GPipe rank does: see :func:`gpipe_throughput`."""

    rank: int
    store_port: int
    duration_s: float
    split: int
    microbatches: int
    threads: int
    warmup_steps: int
    timeout_s: float


def _stage_module(model: nn.Sequential, rank: int, split: int) -> nn.Module:
    """Rank 0's layers ``[0, split)`` or rank 1's layers ``[split, end)`` of ``model``."""
    if not 0 < split < len(model):
        raise ValueError(f"split must leave layers on both ranks: 0 < {split} < {len(model)}")
    return model[:split] if rank == 0 else model[split:]


def _tcp_store(port: int, *, master: bool, timeout_s: float) -> TCPStore:
    """The rendezvous store on loopback: served here if ``master`` (``port`` 0: any free one)."""
    return dist.TCPStore(  # type: ignore[attr-defined]
        LOOPBACK,
        port,
        world_size=STAGES,
        is_master=master,
        wait_for_workers=False,
        timeout=timedelta(seconds=timeout_s),
    )


def _agreed_steps(job: GPipeJob, step_s: float) -> int:
    """Number of timed steps, the same on every rank: ``duration_s`` over the slowest step."""
    slowest = torch.tensor([step_s], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return _iterations(job.duration_s, float(slowest.item()))


def _run_gpipe_rank(job: GPipeJob) -> float:
    """One rank's pipeline loop; returns requests/s as seen by this rank (see the caller)."""
    # Imported here: only the GPipe processes need the pipelining package.
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    device = torch.device("cpu")
    stage = PipelineStage(
        _stage_module(reference_transformer(), job.rank, job.split), job.rank, STAGES, device
    )
    # No loss_fn: the schedule has no backward, step() runs the forwards only.
    schedule = ScheduleGPipe(stage, n_microbatches=job.microbatches)
    # Rank 0 feeds the whole batch (split into micro-batches along dim 0); the others
    # receive their inputs from the previous rank.
    batch = reference_input(job.microbatches) if job.rank == 0 else None

    def step() -> None:
        if batch is None:
            schedule.step()
        else:
            schedule.step(batch)

    with torch.no_grad():
        step_s = 0.0
        for _ in range(job.warmup_steps):  # the first one also infers shapes, sets up P2P
            start = time.perf_counter()
            step()
            step_s = time.perf_counter() - start
        steps = _agreed_steps(job, step_s)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        elapsed = time.perf_counter() - start
    return steps * job.microbatches / elapsed


def _measure_gpipe_rank(job: GPipeJob) -> float:
    """In a spawned process: join the gloo group, run this rank, always leave the group."""
    torch.set_num_threads(job.threads)
    store = _tcp_store(job.store_port, master=False, timeout_s=job.timeout_s)
    dist.init_process_group(
        "gloo",
        store=store,
        rank=job.rank,
        world_size=STAGES,
        timeout=timedelta(seconds=job.timeout_s),
    )
    try:
        return _run_gpipe_rank(job)
    finally:
        dist.destroy_process_group()


def gpipe_throughput(
    duration_s: float,
    *,
    split: int = 6,
    microbatches: int = 8,
    threads: int = 1,
    warmup_steps: int = 2,
    timeout_s: float | None = None,
) -> float:
    """Requests/s of ``torch.distributed.pipelining``'s GPipe over the reference model.

    Two freshly spawned processes (ranks), each with ``torch.set_num_threads(threads)``,
    join a gloo process group (rendezvous on a ``TCPStore`` this process serves on
    127.0.0.1, port picked by the kernel). Each builds ``reference_transformer()`` (seeded:
    identical weights on both) and keeps its half, split at layer ``split``, as a
    ``PipelineStage``; ``ScheduleGPipe`` without a loss function runs forward only. A step
    pushes a batch of ``microbatches`` requests through as many micro-batches of one
    ``(1, 128, 768)`` request each.

    After ``warmup_steps`` untimed steps, the ranks agree on a number of steps lasting
    about ``duration_s`` and time them after a barrier. The figure returned is the last
    rank's: requests whose outputs it produced per second, i.e. end-to-end throughput.
    """
    timeout = default_timeout(duration_s) if timeout_s is None else timeout_s
    store = _tcp_store(0, master=True, timeout_s=timeout)
    port: int = store.port
    jobs = [
        GPipeJob(
            rank=rank,
            store_port=port,
            duration_s=duration_s,
            split=split,
            microbatches=microbatches,
            threads=threads,
            warmup_steps=warmup_steps,
            timeout_s=timeout,
        )
        for rank in range(STAGES)
    ]
    rates = run_isolated(_measure_gpipe_rank, jobs, timeout)
    del store  # served until both ranks are done
    return rates[-1]


# -- contention: CPU taken by anything else while measuring -------------------------------


@dataclass(frozen=True)
class CpuClock:
    """CPU seconds spent so far by the whole machine and by this process tree."""

    machine_s: float  # busy time of all cores: user, nice, system, irq, softirq, steal
    ours_s: float  # this process and its reaped children (the measurements)

    @classmethod
    def read(cls) -> CpuClock | None:
        """Now, from ``/proc/stat`` and ``getrusage``; None where there is no ``/proc/stat``."""
        try:
            with open("/proc/stat", encoding="ascii") as stat:
                fields = [int(v) for v in stat.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = fields
        ticks = os.sysconf("SC_CLK_TCK")
        usages = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return cls(
            machine_s=(user + nice + system + irq + softirq + steal) / ticks,
            ours_s=sum(u.ru_utime + u.ru_stime for u in usages),
        )


def contended(measure: Callable[[], float]) -> tuple[float, float | None]:
    """``measure()`` and the cores' worth of CPU everything else took meanwhile.

    The second figure is the machine's busy CPU time less this process tree's, over the
    wall time of ``measure()`` (spawning and warm-up included); None where unknown. On
    an otherwise idle machine it stays near 0; a baseline that needs both cores (GPipe)
    loses about that much throughput per core taken.
    """
    before, start = CpuClock.read(), time.perf_counter()
    result = measure()
    after, wall = CpuClock.read(), time.perf_counter() - start
    if before is None or after is None:
        return result, None
    others = (after.machine_s - before.machine_s) - (after.ours_s - before.ours_s)
    return result, max(0.0, others) / wall


# -- the run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Length of each measurement and number of runs of each baseline."""

    duration_s: float = 10.0
    runs: int = 5

    @classmethod
    def quick(cls, runs: int = 2) -> Settings:
        return cls(duration_s=3.0, runs=runs)


LOCAL = "local forward, 1 thread"
GPIPE = "GPipe, 2 ranks x 1 thread"
PAIRED = "gpipe/local, per run"
CONTENTION = "CPU taken by others"


def run(settings: Settings, progress: Callable[[str], None] = lambda _: None) -> list[Summary]:
    """``settings.runs`` interleaved runs of both baselines (so drift hits both alike)."""
    local: list[float] = []
    gpipe: list[float] = []
    contention: list[float] = []  # one sample per measurement, where known
    for i in range(settings.runs):
        for rates, measure in (
            (local, lambda: local_throughput(settings.duration_s)),
            (gpipe, lambda: gpipe_throughput(settings.duration_s)),
        ):
            rate, others = contended(measure)
            rates.append(rate)
            if others is not None:
                contention.append(others)
        progress(f"run {i + 1}/{settings.runs}: local {local[-1]:.3f}, gpipe {gpipe[-1]:.3f} req/s")
    summaries = [
        Summary(LOCAL, "req/s", local),
        Summary(GPIPE, "req/s", gpipe),
        Summary(PAIRED, "x", [g / lo for g, lo in zip(gpipe, local, strict=True)]),
    ]
    if contention:
        summaries.append(Summary(CONTENTION, "cores", contention))
    return summaries


# -- reporting ---------------------------------------------------------------------------


def report(settings: Settings, summaries: list[Summary], elapsed: float) -> dict[str, Any]:
    results = {s.name: s for s in summaries}
    ratio = results[GPIPE].median / results[LOCAL].median
    return {
        "settings": asdict(settings),
        "workload": {"model": "reference_transformer()", "request": list(REQUEST_SHAPE)},
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "elapsed_s": elapsed,
        "results": {s.name: s.as_dict() for s in summaries},
        "ratio gpipe/local": {
            "value": ratio,
            "design": DESIGN_RATIO,
            "physical_limit": PHYSICAL_LIMIT,
        },
        "contended": CONTENTION in results and max(results[CONTENTION].samples) > CONTENTION_LIMIT,
    }


def render(data: dict[str, Any]) -> str:
    s = data["settings"]
    local_ms = 1000 / data["results"][LOCAL]["median"]
    ratio = data["ratio gpipe/local"]
    lines = [
        f"Reference throughputs, reference_transformer() on (1, 128, 768) float32 requests, "
        f"{s['runs']} interleaved runs of ~{s['duration_s']:g} s "
        f"(torch {data['torch']}, python {data['python']}, {data['elapsed_s']:.1f} s)",
        "",
        f"  {'baseline':<30}{'unit':>6}{'median':>10}{'min':>10}{'max':>10}",
    ]
    for name, r in data["results"].items():
        lines.append(
            f"  {name:<30}{r['unit']:>6}{r['median']:>10.3f}{r['min']:>10.3f}{r['max']:>10.3f}"
        )
    lines += [
        "",
        f"  {'local latency (median)':<30}{'ms':>6}{local_ms:>10.1f}",
        f"  {'ratio gpipe/local (medians)':<30}{'x':>6}{ratio['value']:>10.2f}   "
        f"DESIGN.md: ~{ratio['design']}, physical limit {ratio['physical_limit']}",
    ]
    if data["contended"]:
        worst = data["results"][CONTENTION]["max"]
        lines.append(
            f"  WARNING: other processes took up to {worst:.2f} cores during a measurement "
            f"(limit {CONTENTION_LIMIT}): these figures understate the baselines"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.baselines",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--quick", action="store_true", help="2 runs of ~3 s each")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    parser.add_argument(
        "--runs", type=int, metavar="N", help="runs of each baseline (default 5; --quick: 2)"
    )
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.quick:
        settings = Settings.quick() if args.runs is None else Settings.quick(args.runs)
    else:
        settings = Settings() if args.runs is None else Settings(runs=args.runs)
    start = time.perf_counter()
    summaries = run(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    data = report(settings, summaries, time.perf_counter() - start)
    print(render(data))
    if args.json is not None:
        args.json.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
