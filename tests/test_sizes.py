"""Sizes given on the worker's command line (``--max-memory``)."""

from __future__ import annotations

import pytest

from butterfly.worker.__main__ import parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1000", 1000),
        ("20000B", 20000),
        ("2GB", 2_000_000_000),
        ("512MiB", 512 << 20),
        ("1.5 GiB", 3 << 29),
        ("4kib", 4096),
    ],
)
def test_sizes_are_bytes_with_decimal_or_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1", "0", "5XB", ""])
def test_a_size_that_is_not_positive_or_has_an_unknown_unit_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size; expected e\.g\. 512MiB"):
        parse_size(text)
