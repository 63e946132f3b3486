"""Model factories used by the tests; worker processes import them as ``tests.models:NAME``.

Faulty models live here, in the test suite, not as switches in the library.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from butterfly.model.zoo import mlp, seeded, small_transformer

__all__ = [
    "counting_mlp",
    "gated_mlp",
    "mlp",
    "raising",
    "random_mlp",
    "slow_loading_mlp",
    "slow_mlp",
    "small_transformer",
]


class Sleep(nn.Module):
    """Takes ``seconds`` per forward: keeps a request in flight long enough to kill a worker."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


class RaiseOnNaN(nn.Module):
    """Raises when the activation holds a NaN: a model that fails on some inputs only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.isnan(x).any():
            raise ValueError("NaN in activation")
        return x


def slow_mlp() -> nn.Sequential:
    """``mlp`` with a 1.5 s pause in the middle stage (layers 2..3 of 6 on 3 workers)."""
    base = mlp()
    return nn.Sequential(base[0], base[1], Sleep(1.5), base[2], base[3], base[4])


#: Inputs whose first element is this value wait at the gate of ``gated_mlp``.
GATED = 1234.5


class Gate(nn.Module):
    """Holds inputs whose first element is ``GATED`` until the file named by the
    BUTTERFLY_TEST_GATE environment variable exists (at most 60 s); passes the rest at once.

    A request is then in flight for exactly as long as the test wants, whatever the load,
    instead of for a fixed time that a slow machine may outrun.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = os.environ.get("BUTTERFLY_TEST_GATE")
        if gate and x.numel() and float(x.reshape(-1)[0]) == GATED:
            deadline = time.monotonic() + 60
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
        return x


def gated_mlp() -> nn.Sequential:
    """``mlp`` behind a :class:`Gate` (on the first stage)."""
    return nn.Sequential(Gate(), *mlp())


class CountCalls(nn.Module):
    """Appends one byte per forward to the file named by BUTTERFLY_TEST_CALLS (if set):
    the test reads how often model code ran in the worker processes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = os.environ.get("BUTTERFLY_TEST_CALLS")
        if path:
            with open(path, "ab") as f:
                f.write(b".")
        return x


def counting_mlp() -> nn.Sequential:
    """``mlp`` with a :class:`CountCalls` in front of each layer."""
    return nn.Sequential(*(m for layer in mlp() for m in (CountCalls(), layer)))


def throttled() -> nn.Sequential:
    """8 layers of 20 ms each, times BUTTERFLY_TEST_SLOWDOWN (default 1): a slower machine.

    The worker measures its layers at start-up, so a worker started with a slowdown of 4
    reports layers 4× as slow and the planner gives it less work.
    """
    factor = float(os.environ.get("BUTTERFLY_TEST_SLOWDOWN", "1"))
    model = nn.Sequential(*(Sleep(0.02 * factor) for _ in range(8)))
    model.example_input = torch.zeros(1, 64)  # what the worker profiles its layers with
    return model


def sleepy() -> nn.Sequential:
    """Three (Linear, 0.5 s pause) pairs: on 3 workers every stage takes 0.5 s without using the CPU."""
    base = mlp()
    return nn.Sequential(base[0], Sleep(0.5), base[2], Sleep(0.5), base[4], Sleep(0.5))


def raising() -> nn.Sequential:
    """``mlp`` whose third layer raises on inputs holding a NaN (it propagates from the input)."""
    base = mlp()
    return nn.Sequential(base[0], base[1], RaiseOnNaN(), base[2], base[3], base[4])


def random_mlp() -> nn.Sequential:
    """Not deterministic unless BUTTERFLY_TEST_SEED is set: each process draws its own weights."""
    seed = os.environ.get("BUTTERFLY_TEST_SEED")
    gen = torch.Generator().manual_seed(int(seed)) if seed else None
    layer = nn.Linear(64, 64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 64, generator=gen))
    return nn.Sequential(layer, nn.GELU(), nn.Linear(64, 64))


class Ballast(nn.Module):
    """A cheap layer with heavy weights: a linear map plus 1 MB of parameters it never reads
    (think of an embedding table or an LM head next to light transformer blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(64, 64)
        self.ballast = nn.Parameter(torch.zeros(250_000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(x)
        return out


def heavy_ends() -> nn.Sequential:
    """Heavy-weight, cheap first and last layers around four light layers of 20 ms each."""
    with seeded(0):
        model = nn.Sequential(Ballast(), *(Sleep(0.02) for _ in range(4)), Ballast())
    model.example_input = torch.zeros(1, 64)
    return model


def slow_loading_mlp() -> nn.Sequential:
    """The mlp, built after a pause (``BUTTERFLY_TEST_LOAD_S`` seconds, default 3): a
    worker that is still loading its model."""
    time.sleep(float(os.environ.get("BUTTERFLY_TEST_LOAD_S", "3")))
    return mlp()
