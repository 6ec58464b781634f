"""Fixtures shared across test directories (the tiny models themselves are in ``tiny_models.py``)."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture
def jsonl(tmp_path):
    """A 12-row table-to-text jsonl file (``source``/``target``) in the test's own folder."""
    path = tmp_path / "toy.jsonl"
    rows = [{"source": f"name : {n} | food : {f}", "target": f"{n} serves {f}."}
            for n in ("Aro", "Bib", "Cot", "Dax") for f in ("fish", "rice", "tea")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose much when other processes hold the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
