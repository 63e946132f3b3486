"""Loading a model from an import path (and optional safetensors weights), and slicing stages out of it.

A model is named by ``package.module:callable``; the callable takes no arguments and
returns a :class:`torch.nn.Sequential`. Without ``weights`` the callable must be
deterministic (seed its RNG): every worker builds its own copy, and the fingerprints
computed at start-up prove that they are the same.

A model named ``hf:/path/to/dir`` is a Hugging Face model directory instead, loaded by
:mod:`.hf`, and ``gguf:/path/model.gguf`` a GGUF file, loaded by :mod:`.gguf`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import torch
from torch import nn

from ..errors import ModelError
from .fingerprint import layer_digest, model_fingerprint
from .info import ModelInfo
from .input_spec import infer_input_spec
from .profile import profile_layers

if TYPE_CHECKING:
    from .hf import HuggingFaceModel

__all__ = ["ModelSource", "import_factory"]


def import_factory(path: str) -> Callable[[], nn.Module]:
    """Resolve ``package.module:callable``; raises ``ModelError`` with the reason."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ModelError(
            f"model {path!r} is not an import path; expected 'package.module:callable'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(f"cannot import module {module_name!r} of model {path!r}: {exc}") from exc
    target: object = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ModelError(
                f"module {module_name!r} has no attribute {attr!r} (model {path!r})"
            ) from None
    if not callable(target):
        raise ModelError(f"model {path!r} names a {type(target).__name__}, not a callable")
    return target


@attrs.define
class ModelSource:
    """Builds the model, fingerprints it, and materialises contiguous ranges of its layers."""

    name: str
    weights: Path | None = None
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    #: Measure every layer at start-up (for the planner).
    profile: bool = True
    #: Element type of the weights of ``hf:`` and ``gguf:`` models (float32 when ``None``).
    dtype: torch.dtype | None = None
    _factory: Callable[[], nn.Module] | None = None
    _info: ModelInfo | None = None
    _hf: HuggingFaceModel | None = None

    def _hf_model(self) -> HuggingFaceModel | None:
        """The adapter of an ``hf:`` or ``gguf:`` model (see :mod:`.hf`, :mod:`.gguf`);
        ``None`` for an import path."""
        if self._hf is None and self.name.startswith(("hf:", "gguf:")):
            from .gguf import GGUFModel
            from .hf import HuggingFaceModel

            if self.weights is not None:
                raise ModelError(
                    f"model {self.name!r} reads its weights from its own files; "
                    f"drop weights={str(self.weights)!r}"
                )
            kind = GGUFModel if self.name.startswith("gguf:") else HuggingFaceModel
            self._hf = kind(
                self.name,
                dtype=self.dtype or torch.float32,
                device=self.device,
                profile=self.profile,
            )
        elif self._hf is None and self.dtype is not None:
            raise ModelError(f"model {self.name!r}: a dtype applies to hf: and gguf: models only")
        return self._hf

    def _build_full(self) -> nn.Sequential:
        if self._factory is None:
            self._factory = import_factory(self.name)
        try:
            model = self._factory()
        except Exception as exc:
            raise ModelError(
                f"model factory {self.name!r} raised {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(model, nn.Sequential):
            raise ModelError(
                f"model factory {self.name!r} returned a {type(model).__name__}; "
                "expected a torch.nn.Sequential whose children are the layers"
            )
        if len(model) == 0:
            raise ModelError(f"model {self.name!r} has no layers")
        return model

    def _load_weights(self, model: nn.Sequential, layer_ids: range) -> None:
        """Copy the tensors of ``layer_ids`` from the safetensors file into ``model``."""
        assert self.weights is not None
        from safetensors import safe_open

        try:
            handle = safe_open(str(self.weights), framework="pt", device="cpu")
        except Exception as exc:
            raise ModelError(f"cannot open weights file {str(self.weights)!r}: {exc}") from exc
        with handle as f:
            by_layer: dict[int, dict[str, torch.Tensor]] = {}
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                head, _, rest = key.partition(".")
                if not head.isdigit() or int(head) >= len(model):
                    raise ModelError(
                        f"weights file {str(self.weights)!r} has tensor {key!r}, which belongs to no "
                        f"layer of {self.name!r} ({len(model)} layers, keys like '0.weight')"
                    )
                if int(head) in layer_ids:
                    by_layer.setdefault(int(head), {})[rest] = f.get_tensor(key)
        for i in layer_ids:
            try:
                model[i].load_state_dict(by_layer.get(i, {}), strict=True)
            except RuntimeError as exc:
                raise ModelError(
                    f"weights file {str(self.weights)!r} does not fit layer {i} of {self.name!r}: {exc}"
                ) from exc

    def describe(self) -> ModelInfo:
        """Build the whole model once: layer count, per-layer digests, input spec."""
        if self._info is None and (hf := self._hf_model()) is not None:
            self._info = hf.describe()
        if self._info is None:
            model = self._build_full()
            if self.weights is not None:
                self._load_weights(model, range(len(model)))
            digests = tuple(layer_digest(layer.state_dict().items()) for layer in model)
            spec = infer_input_spec(model)
            profiles = (
                profile_layers(model.to(self.device).eval(), spec, self.device)
                if self.profile
                else []
            )
            self._info = ModelInfo(
                name=self.name,
                num_layers=len(model),
                fingerprint=model_fingerprint(digests),
                layer_digests=digests,
                input_spec=spec,
                profiles=tuple(profiles),
            )
        return self._info

    def build_layers(self, start: int, stop: int) -> nn.Sequential:
        """Materialise layers ``[start, stop)`` on the device, in eval mode, and check their digests."""
        info = self.describe()
        if not 0 <= start < stop <= info.num_layers:
            raise ModelError(
                f"layer range [{start}, {stop}) is outside model {self.name!r} ({info.num_layers} layers)"
            )
        if (hf := self._hf_model()) is not None:
            return hf.build_layers(start, stop)
        model = self._build_full()
        if self.weights is not None:
            self._load_weights(model, range(start, stop))
        layers = nn.Sequential(*(model[i] for i in range(start, stop)))
        del model
        for offset, layer in enumerate(layers):
            i = start + offset
            if layer_digest(layer.state_dict().items()) != info.layer_digests[i]:
                raise ModelError(
                    f"model factory {self.name!r} is not deterministic: layer {i} differs from the "
                    "one fingerprinted at start-up. Seed its random generator, or pass --weights."
                )
        return layers.to(self.device).eval()
