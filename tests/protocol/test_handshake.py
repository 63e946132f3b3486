"""The Hello handshake: nothing but a valid Hello is accepted first."""

from __future__ import annotations

import math

import pytest

from butterfly.errors import FingerprintMismatch, ProtocolError
from butterfly.protocol import PROTOCOL_VERSION, Handshake, HandshakeState, Heartbeat, Hello


def hello(**kw: object) -> Hello:
    fields: dict[str, object] = {
        "version": PROTOCOL_VERSION,
        "node_id": "w1",
        "role": "worker",
        "model_name": "m:f",
        "fingerprint": "f1",
    }
    fields.update(kw)
    return Hello(**fields)  # type: ignore[arg-type]


def test_valid_hello_establishes_and_records_peer() -> None:
    hs = Handshake(hello(node_id="me"))
    assert hs.receive(hello()) is None
    assert hs.established
    assert hs.peer == hello()


def test_messages_after_hello_pass_through() -> None:
    hs = Handshake(hello(node_id="me"))
    hs.receive(hello())
    assert hs.receive(Heartbeat(1)) == Heartbeat(1)


def test_message_before_hello_is_refused() -> None:
    hs = Handshake(hello(node_id="me"))
    with pytest.raises(ProtocolError, match="expected a Hello as the first message, got Heartbeat"):
        hs.receive(Heartbeat(1))
    assert hs.state is HandshakeState.FAILED


def test_failed_handshake_stays_failed() -> None:
    hs = Handshake(hello(node_id="me"))
    with pytest.raises(ProtocolError):
        hs.receive(Heartbeat(1))
    with pytest.raises(ProtocolError, match="already failed"):
        hs.receive(hello())


def test_other_protocol_version_is_refused() -> None:
    hs = Handshake(hello(node_id="me"))
    with pytest.raises(
        ProtocolError, match=f"speaks protocol version 99; this side speaks {PROTOCOL_VERSION}"
    ):
        hs.receive(hello(version=99))


def test_unexpected_role_is_refused() -> None:
    hs = Handshake(hello(node_id="me"), expect_roles=frozenset({"coordinator"}))
    with pytest.raises(
        ProtocolError, match="has role 'worker'; expected one of \\['coordinator'\\]"
    ):
        hs.receive(hello())


def test_second_hello_is_refused() -> None:
    hs = Handshake(hello(node_id="me"))
    hs.receive(hello())
    with pytest.raises(ProtocolError, match="second Hello"):
        hs.receive(hello())


def test_fingerprint_mismatch_says_factories_must_be_deterministic() -> None:
    hs = Handshake(hello(node_id="me"), expect_model="m:f", expect_fingerprint="f2")
    with pytest.raises(FingerprintMismatch, match=r"different weights.*must be deterministic"):
        hs.receive(hello(fingerprint="f1"))


def test_model_mismatch_is_refused() -> None:
    hs = Handshake(hello(node_id="me"), expect_model="other:model")
    with pytest.raises(FingerprintMismatch, match="serves model 'm:f'"):
        hs.receive(hello())


@pytest.mark.parametrize("interval", [math.inf, math.nan, -1.0, 60.5, 1e8])
def test_an_absurd_heartbeat_interval_is_refused(interval: float) -> None:
    hs = Handshake(hello(node_id="me"))
    with pytest.raises(ProtocolError, match=r"heartbeat interval of .* expected 0 to 60 s"):
        hs.receive(hello(heartbeat_interval=interval))
    assert hs.state is HandshakeState.FAILED
