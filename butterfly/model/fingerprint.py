"""Fingerprints of weights: workers that would compute different answers must not be chained."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch

__all__ = ["layer_digest", "model_fingerprint"]


def layer_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A stable hex digest of one layer's parameters and buffers: names, dtypes, shapes, bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_fingerprint(layer_digests: Sequence[str]) -> str:
    """The fingerprint of a whole model from its per-layer digests, in layer order."""
    h = hashlib.blake2b(digest_size=16)
    for digest in layer_digests:
        h.update(digest.encode())
    return h.hexdigest()
