"""The README's Trainer/TRL route, examples/trainer_sft.py, runs end to end on a tiny local model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny_models import save_tiny_model_dir

pytest.importorskip("trl")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trainer_sft.py"


def test_trainer_sft_example_trains_saves_and_reloads_the_prefix(tmp_path):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(EXAMPLE), "--model", model_dir, "--out", str(tmp_path / "run"),
                           "--max-steps", "10"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trainable params: " in done.stdout
    keys = set(load_file(tmp_path / "run" / "checkpoint-10" / "model.safetensors"))
    assert keys and all(k.startswith("prefix.") for k in keys)
    assert (tmp_path / "run" / "final" / "prefix_config.json").is_file()
    assert done.stdout.strip().splitlines()[-1].startswith("'")  # the reloaded prefix's generation
