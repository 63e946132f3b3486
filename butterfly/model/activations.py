"""The activation functions of ``config.json`` (``hidden_act`` / ``activation_function``)
that the blocks implement, written as ``transformers`` writes them.

Its own module so that :mod:`.architecture` (which checks a config's name against
:data:`ACTIVATIONS`) and :mod:`.blocks` (which calls them) both depend on it, not on each other.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "activation"]


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's tanh approximation, written as ``transformers``' ``NewGELUActivation`` writes it."""
    return (
        0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    )


#: ``hidden_act`` / ``activation_function`` values of ``config.json`` the blocks implement.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return ACTIVATIONS[name]
