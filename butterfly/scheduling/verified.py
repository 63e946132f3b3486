"""Running a request stage by stage under verification (``coordination.verification``).

For each stage the coordinator sends the stage's input to its replicas (``report``
activations), waits for their answers, and votes (:mod:`butterfly.coordination.
verification`): the stage's first holder sends its output, the others only their
claims. The coordinator computes the claim of every output it receives itself. An
output a quorum agrees on becomes the next stage's input; when the first holder is not
in the quorum, the output is collected from one that is (and checked against its
claim). A replica whose answer contradicts the quorum is quarantined, with the evidence;
no quorum fails the request with :class:`~butterfly.errors.ByzantineError`.

``spot_check`` runs two holders per stage and, when they disagree, a third decides. A
sampled generation session runs all three from its first step on (each keeps its own
caches; a replica joining mid-session would have none).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from ..config import CoordinationConfig
from ..coordination import CoordinationService, Placement, error_from_wire
from ..coordination.verification import Claim, claim_of, decide, describe, disagreement
from ..errors import ButterflyError, ByzantineError, CoordinationError, NetworkError
from ..metrics import MetricsSink
from ..metrics.events import ConsensusReached, ReplicasDisagreed
from ..protocol import (
    Activation,
    ActivationProof,
    Collect,
    Error,
    StageOutput,
    StageSpec,
    WireTensor,
)

__all__ = ["VerifiedBatch", "run_verified"]

log = logging.getLogger(__name__)

#: Tensors at least this large are hashed off the trio thread.
_OFF_LOOP_BYTES = 1 << 20


class VerifiedBatch(Protocol):
    request_id: int
    placement: Placement | None
    #: Answers of the current stage's replicas, by node id.
    reports: dict[str, StageOutput | Error]


#: Waits until ``done()`` or the trio clock reaches ``until``; False when the attempt
#: ended meanwhile (an error, a lost worker, every task gone), True otherwise.
Wait = Callable[[Callable[[], bool], float], Awaitable[bool]]


async def run_verified(
    batch: VerifiedBatch,
    tensor: WireTensor,
    *,
    session: int,
    position: int,
    keep: tuple[int, ...],
    whole_session: bool,
    coordination: CoordinationService,
    metrics: MetricsSink,
    wait: Wait,
    timeout: float,
) -> WireTensor | None:
    """The accepted output of the last stage, or ``None`` when the attempt ended early."""
    assert batch.placement is not None
    for spec in batch.placement.stages:
        output = await _verify_stage(
            batch,
            spec,
            tensor,
            session=session,
            position=position,
            keep=keep,
            whole_session=whole_session,
            coordination=coordination,
            metrics=metrics,
            wait=wait,
            timeout=timeout,
        )
        if output is None:
            return None
        tensor = output
    return tensor


async def _verify_stage(
    batch: VerifiedBatch,
    spec: StageSpec,
    tensor: WireTensor,
    *,
    session: int,
    position: int,
    keep: tuple[int, ...],
    whole_session: bool,
    coordination: CoordinationService,
    metrics: MetricsSink,
    wait: Wait,
    timeout: float,
) -> WireTensor | None:
    cfg = coordination.config.coordination
    assert batch.placement is not None
    rid, epoch = batch.request_id, batch.placement.epoch
    holders = [n for n in batch.placement.holders(spec.index) if n not in coordination.quarantined]
    quorum = cfg.max_byzantine + 1 if cfg.verification == "replicate" else 2
    if cfg.verification == "spot_check" and not whole_session:
        rounds_of = [holders[:2], holders[2:]]
    else:
        rounds_of = [holders, []]
    if len(holders) < quorum:
        # A holder was quarantined while the request ran: the new placement has others.
        raise CoordinationError(
            f"stage {spec.index} of request {rid} has {len(holders)} replicas not quarantined; "
            f"{quorum} must agree"
        )
    started = trio.current_time()
    batch.reports = {}
    claims: dict[str, Claim] = {}
    verdict = None
    rounds = 0
    for nodes in rounds_of:
        if not nodes:
            continue
        rounds += 1
        activation = Activation(
            request_id=rid,
            epoch=epoch,
            stage=spec.index,
            origin=coordination.node_id,
            layer=spec.start,
            compute_s=0.0,
            session=session,
            position=position,
            keep=keep,
            trace=(),
            report=True,
            tensor=tensor,
        )
        for node in nodes:
            await coordination.send(node, activation)
        asked = set(nodes)

        def answered(asked: set[str] = asked) -> bool:
            return asked <= batch.reports.keys()

        if not await wait(answered, trio.current_time() + timeout):
            return None
        for node in nodes:
            report = batch.reports.get(node)
            if isinstance(report, StageOutput):
                claims[node] = await _claim(report, node, cfg)
        verdict = decide(claims, quorum, order=holders)
        if verdict.reached:
            break
    assert verdict is not None
    if not verdict.reached:
        errors = [r for r in batch.reports.values() if isinstance(r, Error)]
        if errors and len(errors) == len(batch.reports):
            raise error_from_wire(errors[0])  # e.g. a bad input every replica refused
        if not claims:
            raise NetworkError(f"no replica of stage {spec.index} answered request {rid}")
        metrics.emit(ReplicasDisagreed(rid, spec.index, tuple(sorted(claims)), agreed=False))
        detail = "; ".join(f"{node}: {describe(claim)}" for node, claim in claims.items())
        raise ByzantineError(
            f"stage {spec.index} (layers {spec.start}..{spec.stop - 1}) of request {rid}: "
            f"no {quorum} of its {len(claims)} replicas agree on the output ({detail})"
        )
    output, rounds = await _accepted_output(
        batch, spec, verdict.accepted, claims, coordination, wait, timeout, rounds
    )
    if output is None:
        return None
    agreed = claims[verdict.accepted[0]]
    if verdict.dissenters:
        metrics.emit(ReplicasDisagreed(rid, spec.index, tuple(sorted(claims)), agreed=True))
    for node in verdict.dissenters:
        coordination.quarantine(
            node, _evidence(rid, spec, node, claims[node], verdict.accepted, agreed)
        )
    await _drop_withheld(batch, spec, coordination)
    metrics.emit(
        ConsensusReached(
            epoch,
            tuple(sorted(verdict.accepted)),
            trio.current_time() - started,
            request_id=rid,
            stage=spec.index,
            rounds=rounds,
        )
    )
    return output


async def _claim(report: StageOutput, node: str, cfg: CoordinationConfig) -> Claim:
    """What ``report`` claims; computed here from the output when it came with one."""
    if report.tensor is not None:
        tensor = report.tensor
        if len(tensor.data) >= _OFF_LOOP_BYTES:
            return await trio.to_thread.run_sync(claim_of, tensor, cfg.agreement, cfg.proof_top_k)
        return claim_of(tensor, cfg.agreement, cfg.proof_top_k)
    if cfg.agreement == "exact" and len(report.digest) == 32:
        return report.digest
    if cfg.agreement == "tolerance" and isinstance(report.proof, ActivationProof):
        return report.proof
    return f"no claim from {node}".encode()  # agrees with nothing


async def _accepted_output(
    batch: VerifiedBatch,
    spec: StageSpec,
    accepted: tuple[str, ...],
    claims: dict[str, Claim],
    coordination: CoordinationService,
    wait: Wait,
    timeout: float,
    rounds: int,
) -> tuple[WireTensor | None, int]:
    """The agreed output: one that came with its report, else collected from a member of
    the quorum and checked against the claim it made."""
    for node in accepted:
        report = batch.reports.get(node)
        if isinstance(report, StageOutput) and report.tensor is not None:
            return report.tensor, rounds
    cfg = coordination.config.coordination
    for node in accepted:
        rounds += 1
        withheld = batch.reports.pop(node)
        await coordination.send(node, Collect(batch.request_id, spec.index, send=True))

        def collected(node: str = node) -> bool:
            report = batch.reports.get(node)
            return isinstance(report, StageOutput) and report.tensor is not None

        if not await wait(collected, trio.current_time() + timeout):
            return None, rounds
        if not collected():
            batch.reports.setdefault(node, withheld)
            continue
        report = batch.reports[node]
        assert isinstance(report, StageOutput) and report.tensor is not None
        own = await _claim(report, node, cfg)
        claimed = claims[node]
        if isinstance(own, bytes) or isinstance(claimed, bytes):
            same = own == claimed
        else:
            same = not disagreement(own, claimed)
        if same:
            return report.tensor, rounds
        coordination.quarantine(
            node,
            f"request {batch.request_id} stage {spec.index}: the output it sent "
            f"({describe(own)}) is not the one it claimed ({describe(claimed)})",
        )
    raise CoordinationError(
        f"no replica of the quorum on stage {spec.index} of request {batch.request_id} "
        f"delivered the output it claimed ({', '.join(accepted)})"
    )


async def _drop_withheld(
    batch: VerifiedBatch, spec: StageSpec, coordination: CoordinationService
) -> None:
    """Tell the replicas that kept their outputs that they are not needed."""
    for node, report in batch.reports.items():
        if isinstance(report, StageOutput) and report.tensor is None:
            with contextlib.suppress(ButterflyError):
                await coordination.send(node, Collect(batch.request_id, spec.index, send=False))


def _evidence(
    rid: int, spec: StageSpec, node: str, claim: Claim, accepted: tuple[str, ...], agreed: Claim
) -> str:
    why = ""
    if not isinstance(claim, bytes) and not isinstance(agreed, bytes):
        why = f": {disagreement(claim, agreed)}"
    return (
        f"request {rid} stage {spec.index} (layers {spec.start}..{spec.stop - 1}): its output "
        f"({describe(claim)}) contradicts the one {', '.join(accepted)} agreed on "
        f"({describe(agreed)}){why}"
    )
