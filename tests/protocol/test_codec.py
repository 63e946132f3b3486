"""The wire codec: round-trips, and rejection of every malformed input."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from butterfly.errors import ProtocolError
from butterfly.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Activation,
    Assign,
    Assigned,
    Cancel,
    Checkpoint,
    EndSession,
    Error,
    Heartbeat,
    Hello,
    InputSpec,
    Result,
    StageSpec,
    StageTrace,
    WireTensor,
    array_from_wire,
    array_to_wire,
    decode,
    encode,
)


def _tensor(shape: tuple[int, ...] = (2, 3)) -> WireTensor:
    return array_to_wire(np.arange(np.prod(shape), dtype=np.float32).reshape(shape))


MESSAGES = [
    Hello(
        PROTOCOL_VERSION,
        "w1",
        "worker",
        "m:f",
        "ab" * 16,
        "ws://h:1",
        12,
        ("ws://h:2",),
        InputSpec("float32", 3, 3, (768,)),
    ),
    Heartbeat(7),
    Ack(7),
    Assign(3, (StageSpec(0, 0, 6, "w1", "ws://h:1"), StageSpec(1, 6, 12, "w2", "ws://h:2")), 2.5),
    Assigned(3, "w1"),
    Result(5, 3, (), _tensor()),
    Activation(
        5,
        3,
        1,
        "c1",
        7,
        0.25,
        9,
        12,
        (0, 2),
        (StageTrace(0, "w0", 1.5, 2.5, 0.1, 0.9, 64),),
        True,
        _tensor(),
    ),
    EndSession(9, "c1"),
    Checkpoint(5, 3, 7, _tensor()),
    Error("compute", "boom", 5, "c1"),
    Cancel(5, "c1"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips(message: object) -> None:
    decoded = decode(encode(message))  # type: ignore[arg-type]
    assert type(decoded) is type(message)
    if isinstance(message, Result):
        assert isinstance(decoded, Result)
        assert bytes(decoded.tensor.data) == bytes(message.tensor.data)
        assert decoded.tensor.shape == message.tensor.shape
    else:
        assert decoded == message


def test_activation_payload_is_a_zero_copy_view_of_the_frame() -> None:
    frame = encode(Activation(1, 0, 0, "c", 0, 0.0, 0, 0, (), (), False, _tensor((4, 4))))
    decoded = decode(frame)
    assert isinstance(decoded, Activation)
    assert decoded.tensor.data.obj is frame


@given(
    hnp.arrays(
        dtype=st.sampled_from(["<f4", "<f8", "<f2", "<i8", "<i4", "u1", "?"]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, max_side=5),
    )
)
def test_arrays_round_trip_bitwise(array: np.ndarray) -> None:
    out = array_from_wire(decode(encode(Result(1, 0, (), array_to_wire(array)))).tensor)  # type: ignore[union-attr]
    assert out.dtype == array.dtype
    assert out.shape == array.shape
    assert out.tobytes() == array.tobytes()


def test_big_endian_arrays_travel_as_little_endian_values() -> None:
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    out = array_from_wire(array_to_wire(array))
    np.testing.assert_array_equal(out, array)
    assert out.dtype == np.dtype("<f4")


def test_non_contiguous_arrays_are_sent_contiguously() -> None:
    array = np.arange(12, dtype=np.float32).reshape(3, 4).T
    np.testing.assert_array_equal(array_from_wire(array_to_wire(array)), array)


def test_decoded_array_is_read_only() -> None:
    out = array_from_wire(decode(encode(Result(1, 0, (), _tensor()))).tensor)  # type: ignore[union-attr]
    assert not out.flags.writeable


def test_unsupported_array_dtype_is_refused() -> None:
    with pytest.raises(ProtocolError, match="complex128 cannot be sent"):
        array_to_wire(np.zeros(3, dtype=np.complex128))


def test_truncated_frame_is_refused() -> None:
    frame = encode(Result(1, 0, (), _tensor()))
    with pytest.raises(ProtocolError, match="malformed frame"):
        decode(frame[:-5])


def test_unknown_tag_is_refused() -> None:
    frame = msgspec.msgpack.encode(["launch-missiles", 1])
    with pytest.raises(ProtocolError, match="malformed frame"):
        decode(frame)


def test_garbage_is_refused() -> None:
    with pytest.raises(ProtocolError):
        decode(b"\xc1\xff\x00garbage")


def test_wrong_field_type_is_refused() -> None:
    frame = msgspec.msgpack.encode(["heartbeat", "not-an-int"])
    with pytest.raises(ProtocolError, match="Expected `int`"):
        decode(frame)


def test_oversized_frame_is_refused_before_decoding() -> None:
    frame = encode(Result(1, 0, (), _tensor((16, 16))))
    with pytest.raises(
        ProtocolError, match=f"frame of {len(frame)} bytes exceeds the limit of 100 bytes"
    ):
        decode(frame, max_size=100)


def test_payload_shorter_than_declared_shape_is_refused() -> None:
    tensor = WireTensor("float32", (2, 3), memoryview(b"\x00" * 20))
    with pytest.raises(ProtocolError, match=r"needs 24 bytes of payload, got 20"):
        array_from_wire(tensor)


def test_payload_longer_than_declared_shape_is_refused() -> None:
    tensor = WireTensor("float32", (2, 3), memoryview(b"\x00" * 28))
    with pytest.raises(ProtocolError, match=r"needs 24 bytes of payload, got 28"):
        array_from_wire(tensor)


def test_unknown_dtype_is_refused() -> None:
    tensor = WireTensor("float128", (1,), memoryview(b"\x00" * 16))
    with pytest.raises(ProtocolError, match="unknown tensor dtype 'float128'"):
        array_from_wire(tensor)


def test_declared_size_above_limit_is_refused_before_building() -> None:
    # 2**40 elements: refused from the header alone, nothing is allocated.
    tensor = WireTensor("float32", (1 << 20, 1 << 20), memoryview(b""))
    with pytest.raises(ProtocolError, match="declares 4398046511104 bytes; the limit is 1024"):
        array_from_wire(tensor, max_bytes=1024)


def test_negative_dimension_is_refused() -> None:
    tensor = WireTensor("float32", (-1, 4), memoryview(b""))
    with pytest.raises(ProtocolError, match="negative dimension"):
        array_from_wire(tensor)


def test_too_many_dimensions_are_refused() -> None:
    tensor = WireTensor("uint8", (1,) * 40, memoryview(b"\x00"))
    with pytest.raises(ProtocolError, match="40 dimensions"):
        array_from_wire(tensor)


def test_empty_tensor_round_trips() -> None:
    out = array_from_wire(
        decode(encode(Result(1, 0, (), array_to_wire(np.zeros((0, 3), np.float32))))).tensor
    )  # type: ignore[union-attr]
    assert out.shape == (0, 3)


def test_bfloat16_needs_two_byte_storage() -> None:
    with pytest.raises(ProtocolError, match="does not match array storage"):
        array_to_wire(np.zeros(2, np.float32), dtype="bfloat16")
