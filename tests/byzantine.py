"""Lying workers for the verification tests: stages whose output is wrong in a chosen way.

A lie is applied by a forward hook on the last layer a worker builds for a stage, so
the weights (and the fingerprint the coordinator checks) stay honest. In one process,
:class:`LyingSource` wraps a model source; worker processes use :func:`lying_mlp`,
which lies on the model's last layer when ``BUTTERFLY_TEST_LIE`` names a lie.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
import torch
from torch import nn

from butterfly.model import ModelSource
from butterfly.model.zoo import mlp

__all__ = ["LIES", "Liar", "LyingSource", "lying_mlp"]

#: Every way of lying the tests check.
LIES = ("noise", "sign", "zeros", "replay", "stale", "scale", "every_10th")


class Liar:
    """Turns honest outputs into wrong ones; ``lies`` counts the wrong outputs given."""

    def __init__(self, lie: str, seed: int = 0) -> None:
        if lie not in LIES:
            raise ValueError(f"unknown lie {lie!r}; expected one of {LIES}")
        self.lie = lie
        self.calls = 0
        self.lies = 0
        self._previous: dict[tuple[int, ...], torch.Tensor] = {}
        self._rng = torch.Generator().manual_seed(seed)

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        previous = self._previous.get(tuple(output.shape))
        self._previous[tuple(output.shape)] = output.detach().clone()
        lied = self._lie(output, previous)
        if lied is not output:
            self.lies += 1
        return lied

    def _lie(self, output: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        match self.lie:
            case "noise":
                noise = torch.randn(output.shape, generator=self._rng, dtype=output.dtype)
                return output + noise * output.abs().mean()
            case "sign":
                return -output
            case "zeros":
                return torch.zeros_like(output)
            case "replay" | "stale":
                # Another request's output (replay) or this session's previous step's
                # (stale): the last output of the same shape; honest until there is one.
                return previous if previous is not None else output
            case "scale":
                return output * 1.01
            case _:  # every_10th
                return output * 1.5 if self.calls % 10 == 0 else output


@attrs.define
class LyingSource(ModelSource):
    """A model source whose stages lie on their output (an in-process worker's model)."""

    liar: Liar | None = None

    def build_layers(self, start: int, stop: int) -> nn.Sequential:
        layers = super().build_layers(start, stop)
        if self.liar is not None:
            layers[len(layers) - 1].register_forward_hook(self.liar)
        return layers


def lying_mlp() -> nn.Sequential:
    """``mlp``, lying on its last layer as ``BUTTERFLY_TEST_LIE`` says (honest without it)."""
    model = mlp()
    lie = os.environ.get("BUTTERFLY_TEST_LIE")
    if lie:
        model[len(model) - 1].register_forward_hook(Liar(lie))
    return model
