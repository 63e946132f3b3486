"""Large tensors are sent from their own memory: the parts must form exactly the plain frame."""

from __future__ import annotations

import numpy as np
import pytest

from butterfly.protocol import (
    Activation,
    Hello,
    Result,
    array_to_wire,
    decode,
    encode,
    encode_parts,
)
from butterfly.protocol.codec import SCATTER_THRESHOLD


@pytest.mark.parametrize("n", [SCATTER_THRESHOLD // 4, SCATTER_THRESHOLD // 4 + 1, 1 << 20])
def test_large_tensor_parts_concatenate_to_the_plain_encoding(n: int) -> None:
    array = np.arange(n, dtype=np.float32)
    for message in (
        Activation(7, 2, 1, "c", 3, 0.5, 0, 0, (), (), False, array_to_wire(array)),
        Result(7, 2, (), array_to_wire(array)),
    ):
        parts = encode_parts(message)
        assert len(parts) == 2
        assert b"".join(parts) == encode(message)
        # The payload part is the tensor's own memory, not a copy.
        assert np.shares_memory(np.frombuffer(parts[1], np.float32), array)


def test_small_tensors_and_other_messages_are_one_part() -> None:
    small = Result(1, 0, (), array_to_wire(np.zeros(8, np.float32)))
    assert encode_parts(small) == (encode(small),)
    hello = Hello(1, "n", "worker")
    assert encode_parts(hello) == (encode(hello),)


def test_scattered_frame_decodes_to_the_same_message() -> None:
    array = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
    decoded = decode(b"".join(encode_parts(Result(3, 1, (), array_to_wire(array)))))
    assert isinstance(decoded, Result)
    assert decoded.request_id == 3
    assert np.frombuffer(decoded.tensor.data, np.float32).tobytes() == array.tobytes()
