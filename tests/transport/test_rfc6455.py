"""RFC 6455 framing, sans-IO: headers, masking, close payloads, the accept key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from butterfly.errors import ProtocolError
from butterfly.transport.rfc6455 import (
    InvalidPayload,
    Opcode,
    accept_key,
    close_payload,
    encode_header,
    mask,
    masked_copy,
    parse_close,
    parse_header,
    valid_key,
)


def test_accept_key_matches_the_rfc_example() -> None:
    # RFC 6455 §1.3.
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536, 1 << 32])
@pytest.mark.parametrize("mask_key", [None, b"\x01\x02\x03\x04"])
def test_headers_round_trip_at_every_length_encoding(length: int, mask_key: bytes | None) -> None:
    data = encode_header(Opcode.BINARY, length, mask_key=mask_key)
    header = parse_header(data)
    assert header is not None
    assert (header.fin, header.opcode, header.length, header.mask_key, header.size) == (
        True,
        Opcode.BINARY,
        length,
        mask_key,
        len(data),
    )


def test_incomplete_header_needs_more_bytes() -> None:
    data = encode_header(Opcode.BINARY, 70000, mask_key=b"abcd")
    assert all(parse_header(data[:n]) is None for n in range(len(data)))


def test_reserved_bits_are_refused() -> None:
    with pytest.raises(ProtocolError, match="reserved bits"):
        parse_header(bytes([0x80 | 0x40 | 0x2, 0]))


def test_unknown_opcode_is_refused() -> None:
    with pytest.raises(ProtocolError, match="unknown websocket opcode 0x3"):
        parse_header(bytes([0x83, 0]))


def test_long_control_frame_is_refused() -> None:
    with pytest.raises(ProtocolError, match="PING frame is fragmented or longer than 125"):
        parse_header(encode_header(Opcode.PING, 126))


def _naive_mask(data: bytes, key: bytes, offset: int = 0) -> bytes:
    return bytes(b ^ key[(i + offset) % 4] for i, b in enumerate(data))


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4), st.integers(0, 7))
def test_mask_equals_the_bytewise_definition(data: bytes, key: bytes, offset: int) -> None:
    buf = bytearray(data)
    mask(buf, key, offset=offset)
    assert bytes(buf) == _naive_mask(data, key, offset)


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_masking_twice_restores_the_payload(data: bytes, key: bytes) -> None:
    buf = bytearray(data)
    mask(buf, key)
    mask(buf, key)
    assert bytes(buf) == data


def test_close_payload_round_trips_and_is_cut_to_fit() -> None:
    assert parse_close(close_payload(1009, "too big")) == (1009, "too big")
    assert len(close_payload(1000, "x" * 500)) == 125
    assert parse_close(b"") == (1005, "")


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4), st.integers(0, 7))
def test_masked_copy_equals_masking_a_copy(data: bytes, key: bytes, offset: int) -> None:
    out = bytearray(len(data))
    masked_copy(memoryview(out), data, key, offset=offset)
    assert bytes(out) == _naive_mask(data, key, offset)


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2999, 5000, 65535])
def test_a_close_code_a_peer_may_not_send_is_refused(code: int) -> None:
    with pytest.raises(ProtocolError, match=f"close frame with code {code}"):
        parse_close(code.to_bytes(2, "big"))


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 3000, 4999])
def test_a_registered_or_application_close_code_is_accepted(code: int) -> None:
    assert parse_close(code.to_bytes(2, "big") + b"bye") == (code, "bye")


def test_a_close_reason_that_is_not_utf8_is_invalid_payload() -> None:
    with pytest.raises(InvalidPayload, match="not UTF-8"):
        parse_close(b"\x03\xe8\xff\xfe")


def test_a_one_byte_close_payload_is_refused() -> None:
    with pytest.raises(ProtocolError, match="1-byte payload"):
        parse_close(b"\x03")


def test_an_empty_close_payload_means_no_status_1005() -> None:
    assert parse_close(b"") == (1005, "")


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        (b"dGhlIHNhbXBsZSBub25jZQ==", True),  # the RFC's example: 16 bytes
        (b"not base64!!", False),
        (b"c2hvcnQ=", False),  # base64 of 5 bytes
        (b"", False),
    ],
)
def test_a_websocket_key_is_base64_of_16_bytes(key: bytes, valid: bool) -> None:
    assert valid_key(key) is valid
