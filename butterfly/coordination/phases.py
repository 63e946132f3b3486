"""Phases of a placement epoch and of a request, as an explicit transition table. Sans-IO.

    Assignment ──▶ Computation ──▶ Aggregation ──▶ Commitment
        ▲ │              │
        └─┘◀─────────────┘   (a request re-assigned after losing a worker; an epoch re-sent)

For a *request* attempt: Assignment = a placement is chosen for it, Computation = its
activations are in the pipeline, Aggregation = its output arrived and is split back to
the callers, Commitment = every caller has its answer. For a placement *epoch*:
Assignment = Assign sent, Computation = every worker accepted and it serves requests,
Aggregation = a newer epoch replaced it and its last requests drain, Commitment = none
is left. Phases are per epoch and per request, never a global barrier: requests of
different epochs stay pipelined. Every transition is reported (a metrics event).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from ..errors import CoordinationError

__all__ = ["TRANSITIONS", "Phase", "PhaseTracker"]


class Phase(enum.StrEnum):
    ASSIGNMENT = "assignment"
    COMPUTATION = "computation"
    AGGREGATION = "aggregation"
    COMMITMENT = "commitment"


TRANSITIONS: dict[Phase | None, frozenset[Phase]] = {
    None: frozenset({Phase.ASSIGNMENT}),
    Phase.ASSIGNMENT: frozenset({Phase.ASSIGNMENT, Phase.COMPUTATION}),
    Phase.COMPUTATION: frozenset({Phase.ASSIGNMENT, Phase.AGGREGATION}),
    Phase.AGGREGATION: frozenset({Phase.COMMITMENT}),
    Phase.COMMITMENT: frozenset(),
}


class PhaseTracker:
    """The phase of one epoch or request; ``advance`` enforces :data:`TRANSITIONS`."""

    def __init__(self, scope: str, key: int, on_change: Callable[[str, int, Phase], None]) -> None:
        self.scope = scope
        self.key = key
        self.phase: Phase | None = None
        self._on_change = on_change

    def advance(self, to: Phase) -> None:
        """Move to ``to``; raises ``CoordinationError`` (phase transition failed) if not allowed."""
        if to not in TRANSITIONS[self.phase]:
            raise CoordinationError(
                f"phase transition failed: {self.scope} {self.key} cannot go from "
                f"{self.phase or 'start'} to {to}"
            )
        self.phase = to
        self._on_change(self.scope, self.key, to)
