"""Loading models, weights files, fingerprints, input specs and the stage runtime."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trio
from safetensors.torch import save_file
from torch import nn

from butterfly.errors import ModelError, ProtocolError
from butterfly.model import (
    ModelSource,
    StageRuntime,
    import_factory,
    infer_input_spec,
    torch_from_wire,
    torch_to_wire,
)
from butterfly.model import runtime as runtime_module
from butterfly.model.stage_sessions import SessionKey
from butterfly.model.zoo import mlp, small_transformer
from butterfly.protocol import InputSpec, WireTensor


def test_import_factory_resolves_module_and_attribute() -> None:
    assert import_factory("butterfly.model.zoo:mlp") is mlp


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("butterfly.model.zoo", "expected 'package.module:callable'"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("butterfly.model.zoo:nope", "has no attribute 'nope'"),
        ("butterfly.model.zoo:__all__", "names a list, not a callable"),
    ],
)
def test_import_factory_errors_name_the_path(path: str, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        import_factory(path)


def test_factory_must_return_a_sequential() -> None:
    with pytest.raises(ModelError, match=r"returned a Linear; expected a torch.nn.Sequential"):
        ModelSource("tests.model.test_model:_linear").describe()


def _linear() -> nn.Module:
    return nn.Linear(2, 2)


def test_describe_reports_layers_and_a_stable_fingerprint() -> None:
    a = ModelSource("butterfly.model.zoo:mlp").describe()
    b = ModelSource("butterfly.model.zoo:mlp").describe()
    assert a.num_layers == 6
    assert a.fingerprint == b.fingerprint
    assert len(a.layer_digests) == 6


def test_build_layers_keeps_only_the_range_and_computes_like_the_full_model() -> None:
    source = ModelSource("butterfly.model.zoo:mlp")
    head, tail = source.build_layers(0, 2), source.build_layers(2, 6)
    assert len(head) == 2 and len(tail) == 4
    x = torch.randn(3, 64)
    with torch.inference_mode():
        torch.testing.assert_close(tail(head(x)), mlp()(x), rtol=0, atol=0)


def test_layer_range_outside_the_model_is_refused() -> None:
    with pytest.raises(ModelError, match=r"layer range \[4, 9\) is outside"):
        ModelSource("butterfly.model.zoo:mlp").build_layers(4, 9)


def test_nondeterministic_factory_is_detected_when_building_layers() -> None:
    source = ModelSource("tests.models:random_mlp")
    source.describe()
    with pytest.raises(
        ModelError, match=r"not deterministic: layer 0 differs.*Seed its random generator"
    ):
        source.build_layers(0, 1)


def _save_weights(path: Path, model: nn.Sequential) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def test_weights_file_replaces_the_factory_weights(tmp_path: Path) -> None:
    trained = mlp()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    _save_weights(tmp_path / "w.safetensors", trained)
    source = ModelSource("butterfly.model.zoo:mlp", weights=tmp_path / "w.safetensors")
    assert (
        source.describe().fingerprint
        != ModelSource("butterfly.model.zoo:mlp").describe().fingerprint
    )
    layers = source.build_layers(2, 4)
    torch.testing.assert_close(layers[0].weight, trained[2].weight, rtol=0, atol=0)


def test_weights_file_with_a_foreign_tensor_is_refused(tmp_path: Path) -> None:
    save_file({"7.weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError, match=r"has tensor '7.weight', which belongs to no layer"):
        ModelSource("butterfly.model.zoo:mlp", weights=tmp_path / "w.safetensors").describe()


def test_weights_file_with_wrong_shapes_is_refused(tmp_path: Path) -> None:
    state = {k: v for k, v in mlp().state_dict().items()}
    state["0.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError, match="does not fit layer 0"):
        ModelSource("butterfly.model.zoo:mlp", weights=tmp_path / "w.safetensors").describe()


def test_unreadable_weights_file_is_a_model_error(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match="cannot open weights file"):
        ModelSource("butterfly.model.zoo:mlp", weights=tmp_path / "w.safetensors").describe()


def test_input_spec_of_a_linear_model() -> None:
    assert infer_input_spec(mlp()) == InputSpec(dtype="float32", min_ndim=2, trailing=(64,))


def test_input_spec_of_a_batch_first_transformer() -> None:
    assert infer_input_spec(small_transformer()) == InputSpec(
        dtype="float32", min_ndim=3, max_ndim=3, trailing=(256,)
    )


def test_input_spec_of_an_embedding_accepts_any_integer_dtype() -> None:
    assert infer_input_spec(nn.Sequential(nn.Embedding(10, 4))) == InputSpec(dtype="", min_ndim=1)


def test_input_spec_of_a_conv_fixes_the_rank() -> None:
    assert infer_input_spec(nn.Sequential(nn.Conv2d(3, 4, 3))) == InputSpec(
        dtype="float32", min_ndim=4, max_ndim=4
    )


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool]
)
def test_torch_tensors_round_trip_bitwise(dtype: torch.dtype) -> None:
    x = (torch.randn(3, 5) * 10).to(dtype)
    y = torch_from_wire(torch_to_wire(x))
    assert y.dtype == dtype
    assert torch.equal(y, x)


def test_torch_from_wire_validates_before_building() -> None:
    with pytest.raises(ProtocolError, match="needs 24 bytes"):
        torch_from_wire(WireTensor("float32", (2, 3), memoryview(b"\x00" * 8)))


async def test_stage_runtime_computes_in_a_worker_thread() -> None:
    layers = ModelSource("butterfly.model.zoo:mlp").build_layers(0, 6)
    runtime = StageRuntime(
        layers,
        start=0,
        stop=6,
        device=torch.device("cpu"),
        limiter=trio.CapacityLimiter(1),
        max_bytes=1 << 20,
    )
    x = torch.randn(4, 64)
    out = torch_from_wire(await runtime.forward(torch_to_wire(x)))
    with torch.inference_mode():
        torch.testing.assert_close(out, mlp()(x), rtol=0, atol=0)
    assert np.asarray(out).shape == (4, 64)


class _Threads(nn.Module):
    """Records the thread each forward runs in, and takes ``delay`` seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []
        self.delay = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append(threading.get_ident())
        time.sleep(self.delay)
        return x


async def test_short_one_token_session_steps_run_on_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A threshold far above a preempted thread's delays on a loaded machine, so that only
    # the slow layer's sleep decides "too long".
    monkeypatch.setattr(runtime_module, "INLINE_STEP_S", 0.25)
    layer = _Threads()
    runtime = StageRuntime(
        nn.Sequential(layer),
        start=0,
        stop=1,
        device=torch.device("cpu"),
        limiter=trio.CapacityLimiter(1),
        max_bytes=1 << 20,
    )
    loop = threading.get_ident()
    session: SessionKey = ("coordinator", 1, 0, 0)

    async def step(position: int, tokens: int, rows: int = 1) -> None:
        await runtime.forward(
            torch_to_wire(torch.zeros(rows, tokens)), session=session, position=position
        )

    await step(0, 4)  # the prompt: a thread
    await step(4, 1)  # the first one-token step: a thread, and timed
    await step(5, 1)  # short: on the loop
    await step(6, 3, rows=2)  # a newcomer's prompt joins: several tokens, a thread
    await step(9, 1, rows=2)  # more rows than the step measured: a thread, and timed
    await step(10, 1, rows=2)  # short for 2 rows: on the loop
    layer.delay = 2 * runtime_module.INLINE_STEP_S
    await step(11, 1, rows=2)  # on the loop, but takes too long…
    await step(12, 1, rows=2)  # …so the next one goes back to a thread
    await runtime.forward(torch_to_wire(torch.zeros(1, 1)))  # not a session step: a thread
    on_loop = [t == loop for t in layer.threads]
    assert on_loop == [False, False, True, False, False, True, True, False, False]
