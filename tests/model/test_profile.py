"""Workers measure their layers: time per request, weight bytes, output bytes."""

from __future__ import annotations

import torch
from torch import nn

from butterfly.model import ModelSource
from butterfly.model.input_spec import infer_input_spec
from butterfly.model.profile import ANALYTIC_MS_PER_PARAM, available_memory, profile_layers
from butterfly.model.zoo import mlp
from tests.models import Sleep


def test_profiles_of_an_mlp_carry_exact_bytes_and_positive_times() -> None:
    model = mlp()
    profiles = profile_layers(model, infer_input_spec(model), torch.device("cpu"))
    assert len(profiles) == 6
    assert [p.memory_bytes for p in profiles] == [(64 * 64 + 64) * 4, 0] * 3
    assert [p.output_bytes for p in profiles] == [64 * 4] * 6  # one request of 64 float32
    assert all(p.compute_ms > 0 for p in profiles)


def test_a_slow_layer_measures_slow() -> None:
    model = nn.Sequential(nn.Linear(8, 8), Sleep(0.06), nn.Linear(8, 8))
    profiles = profile_layers(model, infer_input_spec(model), torch.device("cpu"))
    assert profiles[1].compute_ms >= 60
    assert profiles[0].compute_ms < 60 and profiles[2].compute_ms < 60


def test_example_input_attribute_is_used_for_shapes() -> None:
    model = nn.Sequential(Sleep(0.0))
    model.example_input = torch.zeros(3, 5)
    (profile,) = profile_layers(model, infer_input_spec(model), torch.device("cpu"))
    assert profile.output_bytes == 3 * 5 * 4


def test_without_a_usable_input_costs_fall_back_to_parameter_counts() -> None:
    model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 8))
    profiles = profile_layers(model, infer_input_spec(model), torch.device("cpu"))
    assert [p.compute_ms for p in profiles] == [
        800 * ANALYTIC_MS_PER_PARAM,
        72 * ANALYTIC_MS_PER_PARAM,
    ]
    assert [p.output_bytes for p in profiles] == [0, 0]


def test_describe_includes_the_profiles_unless_disabled() -> None:
    assert len(ModelSource("butterfly.model.zoo:mlp").describe().profiles) == 6
    assert ModelSource("butterfly.model.zoo:mlp", profile=False).describe().profiles == ()


def test_available_memory_is_positive_on_the_cpu() -> None:
    assert available_memory(torch.device("cpu")) > 0
