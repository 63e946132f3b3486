"""What a worker tells the cluster about the model it serves (any kind of model source)."""

from __future__ import annotations

import attrs

from ..protocol import InputSpec, LayerProfile

__all__ = ["ModelInfo"]


@attrs.frozen
class ModelInfo:
    """What a worker tells the cluster about the model it serves."""

    name: str
    num_layers: int
    fingerprint: str
    layer_digests: tuple[str, ...]
    input_spec: InputSpec
    #: Measured on this worker's device at start-up (see :mod:`.profile`).
    profiles: tuple[LayerProfile, ...] = ()
    #: Token ids that end a generation by default (the model's EOS; empty: none known).
    eos_token_ids: tuple[int, ...] = ()
