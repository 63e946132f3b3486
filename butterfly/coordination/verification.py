"""Verifying stage outputs against lying workers: claims, agreement, and the vote. Sans-IO.

A stage's replicas each *claim* what they computed: a digest of its canonical bytes
(``exact`` agreement) or a compact :class:`~butterfly.protocol.ActivationProof`
(``tolerance``). The coordinator computes the claim of every output it actually holds
itself, so a replica can lie in its claim or in its output, never in both at once
without being caught. :func:`decide` counts the votes: an output is accepted when
``quorum`` replicas (``f + 1``) agree on it; the replicas that answered otherwise are the
evidence against themselves.

Tolerance thresholds (honest replicas differ by float rounding: different thread
counts, kernels, devices — relative differences around 1e-6 in float32):

* same dtype and shape;
* at least :data:`MIN_OVERLAP` of the top-k indices in common;
* every common top-k value within :data:`VALUE_RTOL` (relative; float16 keeps about
  1e-3, so two honest values may round one unit of the last place apart);
* every block's root mean square within :data:`VALUE_RTOL` (plus :data:`STAT_ATOL`
  times the output's rms, for blocks near zero);
* the mean within :data:`STAT_ATOL` × rms, the rms within :data:`VALUE_RTOL`.

What it cannot catch: a change smaller than these thresholds — e.g. noise of relative
size 1e-4, or a change confined to elements outside the top-k that moves no block's
rms by 0.2 %. ``exact`` agreement catches every changed bit but needs bitwise
identical replicas.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence

import attrs
import numpy as np

from ..protocol import ActivationProof, WireTensor, array_from_wire

__all__ = [
    "MAX_BLOCKS",
    "MIN_OVERLAP",
    "STAT_ATOL",
    "VALUE_RTOL",
    "Claim",
    "Verdict",
    "claim_of",
    "claims_agree",
    "decide",
    "describe",
    "digest",
    "disagreement",
    "make_proof",
]

#: Share of the top-k indices two honest proofs have in common at least.
MIN_OVERLAP = 0.75
#: Relative difference allowed between honest top-k values and block rms values.
VALUE_RTOL = 2e-3
#: Absolute difference allowed in the mean and in near-zero blocks, times the rms.
STAT_ATOL = 1e-3
#: Blocks of elements whose rms a proof keeps (each one's change is visible).
MAX_BLOCKS = 64
_FLOAT16_MAX = 65504.0

#: What a replica says it computed: a digest (``exact``) or a proof (``tolerance``).
Claim = bytes | ActivationProof


def digest(tensor: WireTensor) -> bytes:
    """BLAKE2b-256 of a tensor's canonical bytes: dtype, shape and its C-contiguous data."""
    h = hashlib.blake2b(digest_size=32)
    h.update(f"{tensor.dtype}:{','.join(map(str, tensor.shape))}:".encode())
    h.update(tensor.data)
    return h.digest()


def _as_float(tensor: WireTensor) -> np.ndarray:
    array = array_from_wire(tensor).reshape(-1)
    if tensor.dtype == "bfloat16":  # its 16 bits are the top half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32, copy=False)


def make_proof(tensor: WireTensor, top_k: int) -> ActivationProof:
    """The proof of ``tensor``: its ``top_k`` largest magnitudes, block rms, mean and rms."""
    values = _as_float(tensor)
    n = values.size
    k = min(top_k, n)
    if k:
        indices = np.sort(np.argpartition(np.abs(values), n - k)[n - k :]).astype("<i4")
    else:
        indices = np.empty(0, "<i4")
    top = np.clip(values[indices], -_FLOAT16_MAX, _FLOAT16_MAX).astype("<f2")
    wide = values.astype(np.float64)
    blocks = np.array_split(wide, min(MAX_BLOCKS, n)) if n else []
    block_rms = np.array([np.sqrt(np.mean(b * b)) for b in blocks], dtype=np.float64)
    return ActivationProof(
        dtype=tensor.dtype,
        shape=tuple(tensor.shape),
        indices=indices.tobytes(),
        values=top.tobytes(),
        blocks=np.minimum(block_rms, _FLOAT16_MAX).astype("<f2").tobytes(),
        mean=float(wide.mean()) if n else 0.0,
        rms=float(np.sqrt(np.mean(wide * wide))) if n else 0.0,
    )


def claim_of(tensor: WireTensor, agreement: str, top_k: int) -> Claim:
    """What an honest replica claims of ``tensor`` under ``agreement``."""
    return digest(tensor) if agreement == "exact" else make_proof(tensor, top_k)


def disagreement(a: ActivationProof, b: ActivationProof) -> str:
    """Why two proofs do not describe the same output within tolerance ("" if they do)."""
    if (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape)):
        return f"outputs differ in kind: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    ia, ib = np.frombuffer(a.indices, "<i4"), np.frombuffer(b.indices, "<i4")
    va = np.frombuffer(a.values, "<f2").astype(np.float64)
    vb = np.frombuffer(b.values, "<f2").astype(np.float64)
    if len(ia) != len(va) or len(ib) != len(vb) or len(ia) != len(ib):
        return "proofs of different sizes"
    common, at_a, at_b = np.intersect1d(ia, ib, assume_unique=True, return_indices=True)
    if len(common) < MIN_OVERLAP * len(ia):
        return f"only {len(common)} of {len(ia)} top-k positions in common"
    if len(common):
        x, y = va[at_a], vb[at_b]
        rel = np.abs(x - y) / np.maximum(np.maximum(np.abs(x), np.abs(y)), 1e-30)
        if rel.max() > VALUE_RTOL:
            return (
                f"top-k values differ by up to {rel.max():.3g} (relative; allowed {VALUE_RTOL:g})"
            )
    scale = max(a.rms, b.rms)
    if abs(a.rms - b.rms) > VALUE_RTOL * scale:
        return f"rms {a.rms:.6g} vs {b.rms:.6g}"
    if abs(a.mean - b.mean) > STAT_ATOL * scale + 1e-30:
        return f"mean {a.mean:.6g} vs {b.mean:.6g}"
    ba = np.frombuffer(a.blocks, "<f2").astype(np.float64)
    bb = np.frombuffer(b.blocks, "<f2").astype(np.float64)
    if len(ba) != len(bb):
        return "proofs of different sizes"
    off = np.abs(ba - bb) - (VALUE_RTOL * np.maximum(ba, bb) + STAT_ATOL * scale)
    if len(off) and off.max() > 0:
        block = int(off.argmax())
        return f"block {block} rms {ba[block]:.6g} vs {bb[block]:.6g}"
    return ""


def claims_agree(a: Claim, b: Claim) -> bool:
    if isinstance(a, bytes) or isinstance(b, bytes):
        return a == b
    return not disagreement(a, b)


def describe(claim: Claim) -> str:
    """A short human-readable summary of a claim, for evidence."""
    if isinstance(claim, bytes):
        return f"digest {claim.hex()[:16]}"
    return (
        f"{claim.dtype}{list(claim.shape)} mean {claim.mean:.6g} rms {claim.rms:.6g} "
        f"top {np.abs(np.frombuffer(claim.values, '<f2')).max(initial=0):.4g}"
    )


@attrs.frozen
class Verdict:
    """The vote on one stage: ``accepted`` the replicas that agree with the chosen one
    (empty when no output reached the quorum), ``dissenters`` the others that answered."""

    accepted: tuple[str, ...]
    dissenters: tuple[str, ...]

    @property
    def reached(self) -> bool:
        return bool(self.accepted)


def decide(
    claims: Mapping[str, Claim],
    quorum: int,
    *,
    order: Sequence[str] = (),
    agree: Callable[[Claim, Claim], bool] = claims_agree,
) -> Verdict:
    """Count the votes: the claim that the most replicas agree with wins if at least
    ``quorum`` do (ties go to the earlier replica in ``order``, then by name)."""
    nodes = sorted(claims, key=lambda n: (order.index(n) if n in order else len(order), n))
    best: tuple[str, ...] = ()
    for node in nodes:
        supporters = tuple(m for m in nodes if m == node or agree(claims[node], claims[m]))
        if len(supporters) > len(best):
            best = supporters
    if len(best) < quorum:
        return Verdict(accepted=(), dissenters=())
    return Verdict(accepted=best, dissenters=tuple(n for n in nodes if n not in best))
