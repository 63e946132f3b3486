"""The public surface: names exported at the top level and the error tree."""

from __future__ import annotations

import butterfly
from butterfly import errors


def test_top_level_exports() -> None:
    expected = {
        "AsyncButterfly",
        "Butterfly",
        "ButterflyConfig",
        "ClusterInfo",
        "LocalCluster",
        "StageInfo",
        "WorkerInfo",
        "WorkerState",
        "load_config",
        "ApiError",
        "ButterflyError",
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
    }
    assert expected <= set(dir(butterfly))


def test_every_error_is_a_butterfly_error() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.ButterflyError), name


def test_component_errors_match_the_seven_components() -> None:
    for cls in (
        errors.ApiError,
        errors.SchedulingError,
        errors.PartitionError,
        errors.CoordinationError,
        errors.NetworkError,
        errors.ProtocolError,
        errors.ConfigError,
    ):
        assert cls.__bases__ == (errors.ButterflyError,)


def test_request_timeout_is_also_a_builtin_timeout_error() -> None:
    assert issubclass(errors.RequestTimeout, TimeoutError)
    assert issubclass(errors.RequestTimeout, errors.ApiError)


def test_error_kind_round_trips_through_the_wire_names() -> None:
    for kind, cls in errors.ERROR_KINDS.items():
        assert errors.error_kind(cls("x")) == kind
    assert errors.error_kind(ValueError("x")) == "compute"
