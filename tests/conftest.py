"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.hf_models import save


@pytest.fixture(scope="session")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The directory of a saved tiny Hugging Face model of a family (made once per run;
    tests that change files work on a copy)."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save(family, tmp_path_factory.mktemp(family))
        return made[family]

    return get
