"""Fingerprints of weights: workers that would compute different answers must not be chained."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch

__all__ = ["TensorChunks", "layer_digest", "model_fingerprint", "streamed_digest"]

#: One tensor as a digest sees it: name, dtype (or a stored type's name, ``Q4_1``), shape,
#: and its bytes in row blocks.
TensorChunks = tuple[str, torch.dtype | str, tuple[int, ...], Iterable[torch.Tensor]]


def layer_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A stable hex digest of one layer's parameters and buffers: names, dtypes, shapes, bytes."""
    return streamed_digest(
        (name, t.dtype, tuple(t.shape), (t,))
        for name, t in sorted(named_tensors, key=lambda item: item[0])
    )


def streamed_digest(entries: Iterable[TensorChunks], suffix: bytes = b"") -> str:
    """:func:`layer_digest` of tensors given in order and in row blocks (a tensor never needs
    to be whole in memory), then ``suffix`` (what else decides the layer's answers)."""
    h = hashlib.blake2b(digest_size=16)
    for name, dtype, shape, chunks in entries:
        h.update(f"{name}|{dtype}|{shape}|".encode())
        for chunk in chunks:
            if chunk.numel():
                h.update(
                    chunk.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data
                )
    h.update(suffix)
    return h.hexdigest()


def model_fingerprint(layer_digests: Sequence[str]) -> str:
    """The fingerprint of a whole model from its per-layer digests, in layer order."""
    h = hashlib.blake2b(digest_size=16)
    for digest in layer_digests:
        h.update(digest.encode())
    return h.hexdigest()
