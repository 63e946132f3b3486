"""Which measured worker-to-worker link the planner sees."""

from __future__ import annotations

from butterfly.coordination.service import CoordinationService, _Worker
from butterfly.protocol import PROTOCOL_VERSION, Hello
from butterfly.types import Link


def _worker(node_id: str, dialled: str, advertised: str) -> _Worker:
    hello = Hello(version=PROTOCOL_VERSION, node_id=node_id, role="worker", address=advertised)
    return _Worker(address=dialled, hello=hello)


def test_a_link_reported_under_the_advertised_address_is_found() -> None:
    # The coordinator dialled w1 as localhost; w2 names w1 by the address w1 advertises.
    w1 = _worker("w1", "ws://localhost:7001", "ws://127.0.0.1:7001")
    w2 = _worker("w2", "ws://localhost:7002", "ws://127.0.0.1:7002")
    link = Link(bandwidth_bytes_per_s=1e9, latency_s=1e-4)
    w2.links_in["ws://127.0.0.1:7001"] = link
    assert CoordinationService._measured(w1, w2) == link
    assert CoordinationService._measured(w2, w1) is None


def test_a_link_reported_under_the_dialled_address_is_found() -> None:
    w1 = _worker("w1", "ws://10.0.0.1:7001", "ws://10.0.0.1:7001")
    w2 = _worker("w2", "ws://10.0.0.2:7002", "ws://10.0.0.2:7002")
    link = Link(bandwidth_bytes_per_s=5e8, latency_s=2e-3)
    w2.links_in["ws://10.0.0.1:7001"] = link
    assert CoordinationService._measured(w1, w2) == link
