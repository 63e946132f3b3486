"""The one exception tree of Butterfly.

Every error the library raises in the caller's thread is a :class:`ButterflyError`.
The subclasses follow the components of the system, so ``except NetworkError``
catches exactly the failures of the transport layer::

    ButterflyError
    ├── ApiError              bad input to a public entry point
    │   └── RequestTimeout    a request did not complete within its timeout
    ├── ConfigError           invalid configuration (names the key)
    ├── ProtocolError         malformed or unexpected bytes from a peer
    ├── NetworkError          a peer is unreachable or its link broke
    │   └── AuthenticationError  a peer did not prove the shared secret, or a frame failed its MAC
    ├── CoordinationError     the cluster cannot agree (e.g. weight fingerprints differ)
    │   └── FingerprintMismatch
    ├── PartitionError        no placement of the model is possible
    ├── SchedulingError       the request could not be scheduled
    ├── ModelError            the model could not be loaded or built
    └── ComputeError          a stage failed while running a request

When an error wraps another (an ``OSError``, an ``ExceptionGroup`` from a nursery),
the original is kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "AuthenticationError",
    "ButterflyError",
    "ByzantineError",
    "ComputeError",
    "ConfigError",
    "CoordinationError",
    "FingerprintMismatch",
    "ModelError",
    "NetworkError",
    "PartitionError",
    "ProtocolError",
    "RequestTimeout",
    "SchedulingError",
]


class ButterflyError(Exception):
    """Base class of every error raised by Butterfly."""


class ApiError(ButterflyError):
    """A public entry point was called with an invalid argument or in an invalid state."""


class RequestTimeout(ApiError, TimeoutError):
    """A request did not complete within its timeout; its work was cancelled on the workers."""


class ConfigError(ButterflyError):
    """The configuration is invalid; the message names the offending key."""


class ProtocolError(ButterflyError):
    """A peer sent bytes that do not decode to a valid message, or broke the handshake."""


class NetworkError(ButterflyError):
    """A peer could not be reached, or a link to it broke."""


class AuthenticationError(NetworkError):
    """A peer did not prove the shared secret, or a frame from it failed its integrity check."""


class CoordinationError(ButterflyError):
    """The cluster cannot be brought into a consistent state."""


class ByzantineError(CoordinationError):
    """Not enough replicas of a stage agreed on its output: the request is refused rather
    than answered with an output no quorum vouches for."""


class FingerprintMismatch(CoordinationError):
    """Workers serve different weights for the same model and cannot be combined."""


class PartitionError(ButterflyError):
    """No placement of the model's layers on the available workers exists."""


class SchedulingError(ButterflyError):
    """A request could not be queued or dispatched."""


class QueueFull(SchedulingError):
    """``scheduling.max_queue_size`` requests are already waiting or running: try later."""


class ModelError(ButterflyError):
    """A model could not be imported, built or loaded."""


class ComputeError(ButterflyError):
    """A stage raised while running a request (the worker's message is included)."""


# Error kinds as they travel in ``protocol.Error.kind``; the coordinator maps them back.
ERROR_KINDS: dict[str, type[ButterflyError]] = {
    "api": ApiError,
    "config": ConfigError,
    "protocol": ProtocolError,
    "network": NetworkError,
    "authentication": AuthenticationError,
    "coordination": CoordinationError,
    "fingerprint": FingerprintMismatch,
    "byzantine": ByzantineError,
    "partition": PartitionError,
    "scheduling": SchedulingError,
    "queue_full": QueueFull,
    "model": ModelError,
    "compute": ComputeError,
    "timeout": RequestTimeout,
}


def error_kind(exc: BaseException) -> str:
    """Return the wire name of ``exc``'s class (the most specific known one)."""
    for kind, cls in sorted(ERROR_KINDS.items(), key=lambda kv: -len(kv[1].__mro__)):
        if isinstance(exc, cls):
            return kind
    return "compute"
