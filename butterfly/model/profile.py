"""Measuring a model's layers on this worker: time per request, weight bytes, output bytes.

The planner needs per-layer costs; measured beats guessed (a layer's FLOPs say little
about its speed on a given machine). Each layer runs on a representative input — the
model's ``example_input`` attribute if it has one, else one request shaped from its
:class:`InputSpec` with 128 for sizes the spec leaves free — and the median of a few runs
is kept. When no input can be made, or the model rejects it, costs fall back to an
analytic estimate (proportional to parameter count) and output sizes to 0.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ..protocol import InputSpec, LayerProfile
from .tensors import TORCH_DTYPES

__all__ = ["available_memory", "profile_layers"]

#: Free sizes (sequence length, spatial size) in the representative input.
FREE_DIM = 128
REPEATS = 3
#: A layer whose first run takes longer than this (ms) is measured by that run alone.
SLOW_LAYER_MS = 50.0
#: Milliseconds per parameter in the analytic fallback (≈ 2 FLOPs per parameter at 1 GFLOP/s).
ANALYTIC_MS_PER_PARAM = 2e-6


def _weight_bytes(layer: nn.Module) -> int:
    tensors = [*layer.parameters(), *layer.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _example_input(
    model: nn.Sequential, spec: InputSpec, device: torch.device
) -> torch.Tensor | None:
    example = getattr(model, "example_input", None)
    if isinstance(example, torch.Tensor):
        return example.to(device)
    if (
        not spec.dtype
        or spec.dtype not in TORCH_DTYPES
        or not TORCH_DTYPES[spec.dtype].is_floating_point
    ):
        return None
    ndim = max(spec.min_ndim, len(spec.trailing) + 1)
    shape = [1] + [FREE_DIM] * (ndim - 1 - len(spec.trailing)) + list(spec.trailing)
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator).to(device=device, dtype=TORCH_DTYPES[spec.dtype])


def _analytic(model: nn.Sequential) -> list[LayerProfile]:
    return [
        LayerProfile(
            compute_ms=max(sum(p.numel() for p in layer.parameters()), 1) * ANALYTIC_MS_PER_PARAM,
            memory_bytes=_weight_bytes(layer),
            output_bytes=0,
        )
        for layer in model
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_layers(
    model: nn.Sequential, spec: InputSpec, device: torch.device
) -> list[LayerProfile]:
    """One :class:`LayerProfile` per layer of ``model`` (already on ``device``)."""
    x = _example_input(model, spec, device)
    if x is None:
        return _analytic(model)
    profiles = []
    try:
        with torch.inference_mode():
            for layer in model:
                # The first run warms the layer up (allocations, kernel choice); a slow layer's
                # first run is already a fair measurement, a fast one gets the median of more.
                first, y = timed_ms(layer, x, device)
                times = (
                    [first]
                    if first > SLOW_LAYER_MS
                    else [timed_ms(layer, x, device)[0] for _ in range(REPEATS)]
                )
                if not isinstance(y, torch.Tensor):
                    return _analytic(model)
                profiles.append(
                    LayerProfile(
                        compute_ms=statistics.median(times),
                        memory_bytes=_weight_bytes(layer),
                        output_bytes=y.numel() * y.element_size(),
                    )
                )
                x = y
    except Exception:
        return _analytic(model)
    return profiles


def timed_ms(
    layer: Callable[[torch.Tensor], object], x: torch.Tensor, device: torch.device
) -> tuple[float, object]:
    """Milliseconds ``layer(x)`` takes on ``device`` (synchronised), and its output."""
    _sync(device)
    start = time.perf_counter()
    y = layer(x)
    _sync(device)
    return (time.perf_counter() - start) * 1000, y


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device``: MemAvailable for the CPU, the driver's figure for CUDA."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
