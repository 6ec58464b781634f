"""What the serving benchmarks share: quiet transformers, the common flags, and the model to measure."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from prefixtune.io.hub import DEFAULT_MODEL, load_causal_lm  # noqa: E402


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the flags every serving benchmark takes: --model, --seed, --threads."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL, help="a model name or folder, 'tiny' (the tests' tiny Llama), "
                    "or 'smollm2-random' (SmolLM2-135M's shapes, random weights: speed only, no download)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 on a machine whose cores are busy)")
    return ap


def load_model(name: str, min_positions: int = 0) -> torch.nn.Module:
    """The frozen model to measure: ``name`` through the hub loader, or the tests' tiny Llama for 'tiny'
    (its position table widened to ``min_positions`` when longer contexts are measured)."""
    if name == "smollm2-random":  # SmolLM2-135M's config.json sizes; speed does not depend on the weights
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=max(8192, min_positions), rope_theta=100000.0,
            tie_word_embeddings=True, attn_implementation="sdpa")).requires_grad_(False).eval()
    if name == "tiny":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from tiny_models import tiny

        model = tiny("llama")
        model.config.max_position_embeddings = max(min_positions, model.config.max_position_embeddings)
    else:
        model = load_causal_lm(name)[0]
    return model.requires_grad_(False).eval()


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
