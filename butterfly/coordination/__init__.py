"""Coordination: membership, liveness of workers (phi-accrual), and the placement epoch."""

from .detector import PhiAccrualDetector as PhiAccrualDetector
from .phases import Phase as Phase
from .phases import PhaseTracker as PhaseTracker
from .service import CoordinationService as CoordinationService
from .service import Placement as Placement
from .service import Reported as Reported
from .service import Response as Response
from .service import WorkerLost as WorkerLost
from .service import error_from_wire as error_from_wire
