"""Built-in model factories for the demo, the tests and the benchmarks.

Each factory is deterministic (it seeds its own RNG without touching the caller's),
so workers started without ``--weights`` agree on the weights.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["mlp", "reference_transformer", "seeded", "small_transformer", "transformer"]

# torch's default generator is process-global: two threads seeding and drawing from it
# at once (several in-process workers building stages) would interleave their draws.
_rng_lock = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's global RNG seeded with ``seed``, without disturbing the caller's state."""
    with _rng_lock, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def transformer(layers: int, d_model: int, heads: int, ffn: int, *, seed: int = 0) -> nn.Sequential:
    """``layers`` × ``nn.TransformerEncoderLayer`` (batch-first, no dropout), in eval mode."""
    with seeded(seed):
        model = nn.Sequential(
            *(
                nn.TransformerEncoderLayer(
                    d_model=d_model,
                    nhead=heads,
                    dim_feedforward=ffn,
                    dropout=0.0,
                    batch_first=True,
                )
                for _ in range(layers)
            )
        )
    return model.eval()


def reference_transformer() -> nn.Sequential:
    """The reference benchmark workload of DESIGN.md: 12 layers, d_model 768, 12 heads, FFN 3072."""
    return transformer(12, 768, 12, 3072)


def small_transformer() -> nn.Sequential:
    """The demo's default: 6 layers, d_model 256, 8 heads, FFN 1024. Input ``(batch, seq, 256)``."""
    return transformer(6, 256, 8, 1024)


def mlp() -> nn.Sequential:
    """A tiny 6-layer MLP (64 features), the fast model of the test suite. Input ``(batch, 64)``."""
    with seeded(0):
        layers: list[nn.Module] = []
        for _ in range(3):
            layers += [nn.Linear(64, 64), nn.GELU()]
    return nn.Sequential(*layers).eval()
