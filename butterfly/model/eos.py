"""Which token ids end a generation, read from a model directory as ``transformers`` does."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_eos_token_ids"]


def read_eos_token_ids(directory: Path) -> tuple[int, ...]:
    """``eos_token_id`` (an int or a list) of ``generation_config.json``, else of
    ``config.json``; ``()`` when neither names one.

    ``generation_config.json`` wins because that is what ``transformers``' ``generate``
    stops at: instruction-tuned models list their end-of-turn token there (e.g. Qwen's
    ``<|im_end|>`` beside ``<|endoftext|>``) while ``config.json`` names only one.
    """
    for name in ("generation_config.json", "config.json"):
        path = directory / name
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        value = raw.get("eos_token_id") if isinstance(raw, dict) else None
        if value is None and isinstance(raw, dict):
            # Composite configs (e.g. multimodal) keep it in their text part.
            text = raw.get("text_config")
            value = text.get("eos_token_id") if isinstance(text, dict) else None
        ids = [value] if isinstance(value, int) else value if isinstance(value, list) else []
        found = tuple(i for i in ids if isinstance(i, int) and not isinstance(i, bool) and i >= 0)
        if found:
            return found
    return ()
