"""Fixtures that start real ``python -m butterfly.worker`` processes on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from butterfly import LocalCluster


@pytest.fixture(scope="module")
def transformer_cluster() -> Iterator[LocalCluster]:
    """Three workers × one torch thread serving the demo's transformer."""
    with LocalCluster("butterfly.model.zoo:small_transformer", workers=3, threads=1) as cluster:
        yield cluster
