"""The challenge–response and the frame tags, without any I/O (butterfly.protocol.auth)."""

from __future__ import annotations

import itertools

import pytest

from butterfly.errors import AuthenticationError
from butterfly.protocol.auth import (
    OFFER_MAGIC,
    PROOF_MAGIC,
    TAG_BYTES,
    Authenticator,
    FrameSeal,
)

SECRET = b"correct horse battery staple"


def _pair(
    dialer_secret: bytes = SECRET, acceptor_secret: bytes = SECRET
) -> tuple[Authenticator, Authenticator]:
    return (
        Authenticator(dialer_secret, dialer=True, peer="acceptor"),
        Authenticator(acceptor_secret, dialer=False, peer="dialer"),
    )


def _seals() -> tuple[FrameSeal, FrameSeal]:
    dialer, acceptor = _pair()
    dialer_proof = dialer.proof(acceptor.offer())
    acceptor_proof = acceptor.proof(dialer.offer())
    return dialer.check_proof(acceptor_proof), acceptor.check_proof(dialer_proof)


def test_both_sides_with_the_secret_accept_each_other_and_read_each_others_frames() -> None:
    to_acceptor, to_dialer = _seals()
    frame = b"hello" + to_acceptor.tag((b"hel", b"lo"))
    assert bytes(to_dialer.open(frame)) == b"hello"
    reply = b"ack" + to_dialer.tag((b"ack",))
    assert bytes(to_acceptor.open(reply)) == b"ack"


def test_an_offer_is_the_magic_and_32_fresh_random_bytes() -> None:
    first, second = _pair()
    assert first.offer().startswith(OFFER_MAGIC)
    assert len(first.offer()) == len(OFFER_MAGIC) + 32
    assert first.offer() != second.offer()


def test_different_secrets_are_refused_by_both_sides() -> None:
    dialer, acceptor = _pair(acceptor_secret=b"another secret of 16+ bytes")
    dialer_proof = dialer.proof(acceptor.offer())
    acceptor_proof = acceptor.proof(dialer.offer())
    with pytest.raises(AuthenticationError, match="acceptor did not prove the shared secret"):
        dialer.check_proof(acceptor_proof)
    with pytest.raises(AuthenticationError, match="dialer did not prove the shared secret"):
        acceptor.check_proof(dialer_proof)


def test_a_proof_reflected_back_to_its_author_is_refused() -> None:
    # An attacker without the secret echoes the acceptor's offer and then its proof.
    _, acceptor = _pair()
    offer = acceptor.offer()
    proof = acceptor.proof(offer)
    with pytest.raises(AuthenticationError, match="did not prove"):
        acceptor.check_proof(proof)


def test_a_proof_recorded_on_one_connection_is_refused_on_the_next() -> None:
    dialer, acceptor = _pair()
    recorded_offer = dialer.offer()
    recorded_proof = dialer.proof(acceptor.offer())
    _, fresh_acceptor = _pair()
    fresh_acceptor.proof(recorded_offer)
    with pytest.raises(AuthenticationError, match="did not prove"):
        fresh_acceptor.check_proof(recorded_proof)


def test_a_message_instead_of_an_offer_says_the_peer_has_no_secret() -> None:
    dialer, _ = _pair()
    with pytest.raises(AuthenticationError, match="did not offer authentication"):
        dialer.proof(b"\x93\xa5hello")


def test_a_secret_shorter_than_16_bytes_is_refused() -> None:
    with pytest.raises(AuthenticationError, match="has 5 bytes; at least 16"):
        Authenticator(b"short", dialer=True, peer="x")


def test_a_frame_tag_is_16_bytes_and_the_proof_starts_with_its_magic() -> None:
    dialer, acceptor = _pair()
    assert dialer.proof(acceptor.offer()).startswith(PROOF_MAGIC)
    to_acceptor, _ = _seals()
    assert len(to_acceptor.tag((b"x",))) == TAG_BYTES


def _tagged(seal: FrameSeal, body: bytes) -> bytes:
    return body + seal.tag((body,))


def test_an_altered_frame_is_refused() -> None:
    to_acceptor, to_dialer = _seals()
    frame = bytearray(_tagged(to_acceptor, b"activation bytes"))
    frame[3] ^= 0x01
    with pytest.raises(AuthenticationError, match="frame 0 from dialer failed its integrity check"):
        to_dialer.open(frame)


def test_a_replayed_frame_is_refused() -> None:
    to_acceptor, to_dialer = _seals()
    frame = _tagged(to_acceptor, b"assign layers 0..3")
    to_dialer.open(frame)
    with pytest.raises(AuthenticationError, match="frame 1 from dialer failed"):
        to_dialer.open(frame)


def test_a_frame_that_overtakes_or_replaces_a_dropped_one_is_refused() -> None:
    to_acceptor, to_dialer = _seals()
    _tagged(to_acceptor, b"first")
    second = _tagged(to_acceptor, b"second")
    with pytest.raises(AuthenticationError, match="frame 0 from dialer failed"):
        to_dialer.open(second)


def test_a_frame_is_not_accepted_in_the_other_direction() -> None:
    to_acceptor, _ = _seals()
    frame = _tagged(to_acceptor, b"sent to the acceptor")
    with pytest.raises(AuthenticationError, match="failed its integrity check"):
        to_acceptor.open(frame)  # the dialer's own frame, echoed back to it


def test_a_frame_shorter_than_a_tag_is_refused() -> None:
    _, to_dialer = _seals()
    with pytest.raises(AuthenticationError, match="too short for a tag"):
        to_dialer.open(b"short")


@pytest.mark.parametrize("cuts", [(), (1,), (5, 6, 17), tuple(range(0, 300, 16))])
def test_a_frame_fed_in_pieces_is_checked_as_the_same_frame_fed_whole(
    cuts: tuple[int, ...],
) -> None:
    to_acceptor, to_dialer = _seals()
    body = bytes(range(256)) + b"tail"
    mac = to_acceptor.outgoing()
    edges = (0, *cuts, len(body))
    for start, stop in itertools.pairwise(edges):
        mac.update(body[start:stop])
    assert bytes(to_dialer.open(body + mac.finish())) == body


def test_frames_are_numbered_in_the_order_their_tags_are_computed() -> None:
    to_acceptor, to_dialer = _seals()
    abandoned = to_dialer.incoming()  # a receive that was cancelled before its frame came
    del abandoned
    frame = _tagged(to_acceptor, b"first frame")
    assert bytes(to_dialer.open(frame)) == b"first frame"
