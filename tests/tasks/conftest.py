"""Fixtures shared by the metric tests."""

import shutil
from collections.abc import Iterator

import pytest

from prefixtune.tasks.metrics import MeteorScorer


@pytest.fixture(scope="module")
def meteor_scorer() -> Iterator[MeteorScorer | None]:
    """One METEOR process for the whole module (it takes ~10 s to load); None without Java."""
    if shutil.which("java") is None:
        yield None
        return
    with MeteorScorer() as scorer:
        yield scorer
