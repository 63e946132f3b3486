"""Hugging Face models as Butterfly layers, read offline from a local directory.

A model named ``hf:/path/to/dir`` is a directory with ``config.json`` and ``*.safetensors``
(what ``save_pretrained(..., safe_serialization=True)`` writes). Nothing is fetched from
anywhere, and ``transformers`` is not needed: ``config.json`` is read by
:mod:`butterfly.model.architecture` and the blocks are :mod:`butterfly.model.blocks`, which
compute what ``transformers``' own modules compute. Supported families (``config.json``'s
``model_type``): ``gpt2`` and ``llama`` decoders, ``bert`` encoders.

The pieces, one job each: :mod:`.hf_layers` (the layers and the packed tensor that travels
between them), :mod:`.hf_families` (which checkpoint tensors each layer takes),
:mod:`.safetensors_files` (reading them); this module maps ``config.json`` to a family and
builds, fingerprints and profiles the layers.

*Padding.* Token ids below 0 mark padding: ``[[5, 7, 9], [4, 2, -1]]`` is a batch of a
3-token and a 2-token sequence. The embeddings layer looks those positions up as the
model's ``pad_token_id`` (0 when it has none) and masks them out of attention. Positions
are ``0 .. seq-1`` in every row, as in the ``transformers`` forward without
``position_ids``: pad on the right.

*Partial loading.* The whole architecture is built on the ``meta`` device (no memory);
only the tensors of the requested layers are read from the safetensors files and cast to
the configured dtype (float32, float16 or bfloat16). ``describe()`` hashes every layer's
tensors chunk by chunk and drops them; profiles are computed from tensor sizes and a FLOP
estimate, never by running the model.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch
from torch import nn
from tqdm.auto import tqdm  # type: ignore[import-untyped,unused-ignore]

from ..errors import ModelError
from ..protocol import InputSpec, LayerProfile
from .architecture import Architecture, parse_architecture
from .eos import read_eos_token_ids
from .fingerprint import TensorChunks, model_fingerprint, streamed_digest
from .hf_families import FAMILIES, Family, LayerPlan
from .info import ModelInfo
from .profile import ANALYTIC_MS_PER_PARAM, timed_ms
from .safetensors_files import CheckpointStatistics, SafetensorsFiles

__all__ = ["HF_PREFIX", "SUPPORTED_DTYPES", "HuggingFaceModel", "parse_hf_name"]

#: Model names with this prefix are Hugging Face model directories.
HF_PREFIX = "hf:"
SUPPORTED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
#: Sequence length of the representative request the profiles describe.
PROFILE_TOKENS = 128
#: The largest piece of one tensor that ``describe()`` holds while hashing it.
DIGEST_CHUNK_BYTES = 16 << 20
#: ``config.json`` keys that name where or with what a model was saved, not what it computes.
_PROVENANCE_KEYS = ("_name_or_path", "transformers_version")
#: FLOP rate assumed when the device cannot be measured: what ``profile.py`` assumes
#: (2 FLOPs per parameter in ANALYTIC_MS_PER_PARAM ms), 1 GFLOP/s.
_FALLBACK_FLOPS_PER_MS = 2 / ANALYTIC_MS_PER_PARAM


class Checkpoint(Protocol):
    """Where a model's tensors are: safetensors files, or a GGUF file."""

    @property
    def stored(self) -> Mapping[str, Any]:
        """Checkpoint key → the stored tensor (its ``shape`` is read)."""

    def reading(self) -> contextlib.AbstractContextManager[Any]: ...

    def statistics(self) -> CheckpointStatistics: ...


def _layer_digest(entries: Iterable[TensorChunks], config: bytes) -> str:
    """A layer's digest: its tensors, then the model's configuration, which changes the
    answers as much as the weights do."""
    return streamed_digest(entries, b"config|" + config)


def parse_hf_name(name: str) -> Path:
    """The directory of ``hf:/path/to/dir`` (``~`` expanded); ``ModelError`` when it is not one."""
    if not name.startswith(HF_PREFIX) or not name[len(HF_PREFIX) :]:
        raise ModelError(f"model {name!r} is not a Hugging Face model; expected 'hf:/path/to/dir'")
    directory = Path(name[len(HF_PREFIX) :]).expanduser()
    if not directory.is_dir():
        raise ModelError(
            f"model {name!r}: {str(directory)!r} is not a directory; expected a directory "
            "with config.json and *.safetensors"
        )
    if not (directory / "config.json").is_file():
        raise ModelError(
            f"model {name!r}: {str(directory)!r} has no config.json; expected a directory "
            "written by save_pretrained (config.json and *.safetensors)"
        )
    return directory


@attrs.define
class HuggingFaceModel:
    """A Hugging Face model directory as a list of Butterfly layers.

    >>> model = HuggingFaceModel("hf:/models/gpt2", dtype=torch.float16)   # doctest: +SKIP
    >>> model.describe().num_layers                                        # doctest: +SKIP
    14
    >>> stage = model.build_layers(1, 7)         # reads blocks 0..5 only  # doctest: +SKIP
    """

    name: str
    dtype: torch.dtype = torch.float32
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    #: Compute per-layer profiles in ``describe()`` (analytic; no forward pass).
    profile: bool = True
    directory: Path = attrs.field(init=False)
    _config: Architecture | None = attrs.field(init=False, default=None)
    _config_bytes: bytes = attrs.field(init=False, default=b"")
    _family: Family | None = attrs.field(init=False, default=None)
    _checkpoint: Checkpoint | None = attrs.field(init=False, default=None)
    _info: ModelInfo | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.directory = self._locate()
        if self.dtype not in SUPPORTED_DTYPES.values():
            raise ModelError(
                f"model {self.name!r}: dtype {self.dtype} is not supported; "
                f"expected one of {', '.join(SUPPORTED_DTYPES)}"
            )

    # -- where the configuration and the tensors come from (GGUFModel overrides these) --

    def _locate(self) -> Path:
        return parse_hf_name(self.name)

    def _raw_config(self) -> dict[str, Any]:
        """``config.json``, parsed."""
        path = self.directory / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot read {str(path)!r}: {exc}") from exc
        if not isinstance(raw, dict):
            raise ModelError(f"{str(path)!r} is not a JSON object")
        return raw

    def _open_checkpoint(self) -> Checkpoint:
        return SafetensorsFiles(self.directory)

    def _where(self) -> str:
        """The tensors' place, in errors."""
        return f"the safetensors files in {str(self.directory)!r}"

    def _digest_entry(self, reader: Any, name: str, key: str, meta: torch.Tensor) -> TensorChunks:
        """What the fingerprint hashes of one tensor: its values in the configured dtype."""
        dtype = self.dtype if meta.is_floating_point() else meta.dtype
        shape = self._reader_source().stored[key].shape
        return (name, dtype, shape, reader.chunks(key, dtype, DIGEST_CHUNK_BYTES))

    def _loaded_entry(self, reader: Any, name: str, key: str, tensor: torch.Tensor) -> TensorChunks:
        """The same for a tensor ``build_layers`` loaded, to check it against the fingerprint."""
        return (name, tensor.dtype, tuple(tensor.shape), (tensor,))

    def _display_name(self) -> str:
        # The directory's name, not its path: workers on different hosts keep the model
        # in different places; the fingerprint is what proves they hold the same weights.
        return f"hf:{self.directory.name}"

    def _eos_token_ids(self) -> tuple[int, ...]:
        return read_eos_token_ids(self.directory)

    # -- configuration -----------------------------------------------------------------

    def _load_config(self) -> tuple[Architecture, Family]:
        """What ``config.json`` says the model computes, and its family."""
        if self._config is not None and self._family is not None:
            return self._config, self._family
        raw = self._raw_config()
        model_type = raw.get("model_type")
        family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
        if family is None:
            raise ModelError(
                f"model {self.name!r} has model_type {model_type!r}; "
                f"supported: {', '.join(sorted(FAMILIES))}"
            )
        arch = parse_architecture(raw, f"model {self.name!r}")
        if family.encoder:
            self._check_pooling()
        canonical = {k: v for k, v in raw.items() if k not in _PROVENANCE_KEYS}
        self._config_bytes = json.dumps(canonical, sort_keys=True).encode()
        self._config, self._family = arch, family
        return arch, family

    def _check_pooling(self) -> None:
        """A sentence-transformers directory must ask for what :class:`MeanPooling` does."""
        modules_path = self.directory / "modules.json"
        if not modules_path.is_file():
            return
        try:
            modules = json.loads(modules_path.read_text(encoding="utf-8"))
            kinds = {str(m["type"]).rsplit(".", 1)[-1]: str(m.get("path", "")) for m in modules}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"cannot read {str(modules_path)!r}: {exc}") from exc
        modes: dict[str, Any] = {}
        if "Pooling" in kinds:
            pooling_path = self.directory / kinds["Pooling"] / "config.json"
            try:
                modes = json.loads(pooling_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot read {str(pooling_path)!r}: {exc}") from exc
        active = sorted(k for k, v in modes.items() if k.startswith("pooling_mode") and v is True)
        if (
            "Pooling" not in kinds
            or active != ["pooling_mode_mean_tokens"]
            or "Normalize" not in kinds
        ):
            raise ModelError(
                f"model {self.name!r} is a sentence-transformers model with modules "
                f"{sorted(kinds)} and pooling {active or 'none'}; only mean pooling followed by "
                "Normalize is supported"
            )

    def _reader_source(self) -> Checkpoint:
        if self._checkpoint is None:
            self._checkpoint = self._open_checkpoint()
        return self._checkpoint

    def statistics(self) -> CheckpointStatistics:
        """What has been read from the safetensors files (for tests and memory accounting)."""
        return self._reader_source().statistics()

    def _plans(self) -> list[LayerPlan]:
        """The whole model's layers on the meta device (no memory)."""
        arch, family = self._load_config()
        with torch.device("meta"):
            return family.layers(arch)

    def _checkpoint_keys(self, plan: LayerPlan) -> dict[str, str]:
        """Layer state-dict name → checkpoint key; ``ModelError`` naming a tensor that is missing."""
        arch, family = self._load_config()
        checkpoint = self._reader_source()
        tied = dict([family.tied_head]) if family.tied_head and arch.tie_word_embeddings else {}
        prefix = family.base_prefix + "."
        state = plan.layer.state_dict(keep_vars=True)
        keys = {}
        for name, model_key in plan.model_keys().items():
            key = tied.get(model_key, model_key)
            candidates = [key, key[len(prefix) :] if key.startswith(prefix) else prefix + key]
            # Old checkpoints name LayerNorm parameters gamma and beta.
            for candidate in list(candidates):
                for new, old in ((".weight", ".gamma"), (".bias", ".beta")):
                    if candidate.endswith(new):
                        candidates.append(candidate[: -len(new)] + old)
            found = next((c for c in candidates if c in checkpoint.stored), None)
            if found is None:
                raise ModelError(
                    f"model {self.name!r}: {self._where()} have no "
                    f"tensor {model_key!r} (tried {', '.join(repr(c) for c in candidates)})"
                )
            expected = tuple(state[name].shape)
            if checkpoint.stored[found].shape != expected:
                raise ModelError(
                    f"model {self.name!r}: tensor {found!r} has shape {checkpoint.stored[found].shape}, "
                    f"but the configuration makes it {expected}"
                )
            keys[name] = found
        return keys

    # -- what ModelSource asks --------------------------------------------------------

    def describe(self) -> ModelInfo:
        """Layer count, per-layer digests (streamed from the files), input spec, analytic profiles."""
        if self._info is not None:
            return self._info
        checkpoint = self._reader_source()
        plans = self._plans()
        digests = []
        for plan in plans:
            # Files are opened per layer and closed once it is hashed.
            with checkpoint.reading() as reader:
                keys = self._checkpoint_keys(plan)
                state = plan.layer.state_dict(keep_vars=True)
                entries = (
                    self._digest_entry(reader, name, keys[name], state[name])
                    for name in sorted(keys)
                )
                digests.append(_layer_digest(entries, self._config_bytes))
        info = ModelInfo(
            name=self._display_name(),
            num_layers=len(plans),
            fingerprint=model_fingerprint(digests),
            layer_digests=tuple(digests),
            input_spec=InputSpec(
                dtype="int64",
                min_ndim=2,
                max_ndim=2,
                max_length=self._load_config()[0].max_positions,
            ),
            profiles=tuple(self._profiles(plans)) if self.profile else (),
            eos_token_ids=self._eos_token_ids(),
        )
        self._info = info
        return info

    def _profiles(self, plans: list[LayerPlan]) -> list[LayerProfile]:
        arch, _ = self._load_config()
        tokens = min(PROFILE_TOKENS, arch.max_positions)
        rate = _flops_per_ms(self.device, self.dtype, arch.hidden_size, tokens)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        profiles = []
        for plan in plans:
            # What build_layers holds: stored tensors in the configured dtype, derived
            # buffers (rotary frequencies, position ids) in their own.
            stored = plan.layer.state_dict(keep_vars=True).values()
            derived = [
                b
                for m in plan.layer.modules()
                for n, b in m.named_buffers(recurse=False)
                if n in m._non_persistent_buffers_set
            ]
            memory = sum(
                t.numel() * (itemsize if t.is_floating_point() else t.element_size())
                for t in stored
            )
            memory += sum(b.numel() * b.element_size() for b in derived)
            profiles.append(
                LayerProfile(
                    compute_ms=plan.layer.flops(tokens) / rate,
                    memory_bytes=memory,
                    output_bytes=plan.layer.output_numel(tokens) * itemsize,
                )
            )
        return profiles

    def build_layers(self, start: int, stop: int) -> nn.Sequential:
        """Layers ``[start, stop)`` (a range :class:`ModelSource` checked) on the device in eval
        mode; only their tensors are read."""
        info = self.describe()
        selected = self._plans()[start:stop]
        checkpoint = self._reader_source()
        loaded: dict[str, torch.Tensor] = {}  # one copy of a tensor two layers share (tied)
        # A progress bar on the worker's terminal; silent when stderr is not a terminal
        # (a log file).
        progress = tqdm(
            selected,
            desc=f"loading layers {start}..{stop - 1}",
            unit="layer",
            disable=None,
            file=sys.stderr,
        )
        with checkpoint.reading() as reader, progress:
            for plan in progress:
                keys = self._checkpoint_keys(plan)
                state = {}
                for name, key in keys.items():
                    if key not in loaded:
                        loaded[key] = reader.read(key, self.dtype)
                    state[name] = loaded[key]
                plan.layer.load_state_dict(state, strict=True, assign=True)
        for offset, plan in enumerate(selected):
            i = start + offset
            meta = [
                n
                for n, t in (*plan.layer.named_parameters(), *plan.layer.named_buffers())
                if t.is_meta
            ]
            if meta:
                raise ModelError(
                    f"model {self.name!r}: layer {i} has tensors that were not loaded: {meta}"
                )
            state = plan.layer.state_dict()
            keys = self._checkpoint_keys(plan)
            entries = (self._loaded_entry(reader, n, keys[n], state[n]) for n in sorted(state))
            if _layer_digest(entries, self._config_bytes) != info.layer_digests[i]:
                raise ModelError(
                    f"model {self.name!r}: layer {i} differs from the one fingerprinted at start-up; "
                    f"were {self._where()} changed? Restart the worker."
                )
        layers = nn.Sequential(*(plan.layer for plan in selected))
        layers.requires_grad_(False)
        return layers.to(self.device).eval()


def _flops_per_ms(device: torch.device, dtype: torch.dtype, hidden: int, tokens: int) -> float:
    """This device's matmul rate in ``dtype`` near the model's width: a few ms, no weights needed.

    The width is kept within [256, 1024]: narrower products measure call overhead, wider
    ones take long on a CPU without changing the rate much.
    """
    width = min(max(hidden, 256), 1024)
    try:
        a = torch.randn(tokens, width, device=device).to(dtype)
        b = torch.randn(width, 4 * width, device=device).to(dtype)
        with torch.inference_mode():
            times = [timed_ms(lambda x: torch.matmul(x, b), a, device)[0] for _ in range(4)]
        ms = statistics.median(times[1:])
    except Exception:
        return _FALLBACK_FLOPS_PER_MS
    return 2 * tokens * width * 4 * width / ms if ms > 0 else _FALLBACK_FLOPS_PER_MS
