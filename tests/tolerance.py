"""How far apart two float computations of the same value may be, derived, not guessed.

Two computations that are the same mathematically but sum in another order (another
sequence length, so other matmul blockings and kernels; another CPU's vector width) differ
by rounding only. A sum of ``n`` products rounds to within ``n · eps`` of the sum of their
magnitudes (the standard bound for a dot product, Higham, *Accuracy and Stability of
Numerical Algorithms*, §3.1). Through a network, each reduction on the way adds its
error, carried forward at the scale of the values (normalisation keeps them at that scale),
so to first order the outputs differ by at most

    eps × max |output| × (sum of the reduction lengths on the path from input to output)

Where two computations are the same op sequence on the same shapes and thread count, they
are bitwise equal and tests compare them with ``rtol=0, atol=0`` instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tests.hf_models import config

__all__ = ["reduction_length", "rounding_bound", "torch_threads"]


def rounding_bound(expected: torch.Tensor, reduction_length: int) -> float:
    """The absolute difference that rounding alone can make to ``expected`` (see the module)."""
    eps = torch.finfo(expected.dtype).eps
    return eps * float(expected.abs().max()) * reduction_length


def reduction_length(family: str, seq: int) -> int:
    """Sum of the reduction lengths from token ids to the output of a test model of ``family``
    (``tests.hf_models``) over ``seq`` tokens: per block the QKV, score, weighted-sum,
    output and two MLP reductions, then the LM head (or the pooling, which is shorter)."""
    c = config(family)
    hidden = c.hidden_size
    inner = getattr(c, "intermediate_size", None) or 4 * hidden
    head_dim = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
    per_block = hidden + head_dim + seq + hidden + hidden + inner
    return c.num_hidden_layers * per_block + hidden


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` intra-op threads: a computation compared bitwise with one in
    another process must split its work the same way (a worker process's ``--threads``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
