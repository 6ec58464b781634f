"""Saving and loading prefixes: safetensors + JSON, atomic writes, base-model fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .architectures import read_spec
from .config import PrefixConfig
from .fileio import atomic_write, atomic_write_text, sha256_file

if TYPE_CHECKING:
    from .model import PrefixModel

FORMAT = "prefixtune/1"
CONFIG_NAME = "prefix_config.json"
WEIGHTS_NAME = "prefix.safetensors"


@torch.no_grad()
def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies a base model: architecture, shapes, and a hash of some of its weights."""
    spec = read_spec(model)
    emb = model.get_input_embeddings().weight
    rows = emb[: min(64, emb.shape[0])].detach().float().cpu().contiguous()
    last = [p for p in model.parameters() if p.ndim == 2][-1]
    tail = last[:8].detach().float().cpu().contiguous()
    h = hashlib.sha256(rows.numpy().tobytes())
    h.update(tail.numpy().tobytes())
    return {
        "architecture": spec.architecture,
        "model_type": spec.model_type,
        "stacks": {s.name: {"layers": s.num_layers, "kv_heads": s.num_kv_heads, "head_dim": s.head_dim}
                   for s in spec.stacks},
        "hidden_size": spec.hidden_size,
        "vocab_size": spec.vocab_size,
        "weights_sha256": h.hexdigest(),
    }


def compare_fingerprints(saved: dict[str, Any], actual: dict[str, Any], where: str) -> None:
    """Raise ValueError listing every field where the saved base model differs from ``actual``.

    Architecture names may differ (a prefix saved on ``LlamaForCausalLM`` loads on ``LlamaModel``)
    as long as everything else agrees.
    """
    diffs = [
        f"{key}: saved {saved.get(key)!r}, this model {actual.get(key)!r}"
        for key in ("model_type", "stacks", "hidden_size", "vocab_size", "weights_sha256")
        if saved.get(key) != actual.get(key)
    ]
    if diffs:
        raise ValueError(
            f"{where}: this prefix was trained on a different base model "
            f"({saved.get('architecture')}); differences: " + "; ".join(diffs)
        )


def save_prefix(model: PrefixModel, directory: str | Path, fold: bool = True) -> None:
    """Write ``prefix.safetensors`` (only the prefix tensors) and ``prefix_config.json``.

    ``fold=True`` stores the computed prefix; ``fold=False`` keeps the MLP to resume training.
    """
    directory = Path(directory)
    tensors = _folded_state(model) if fold else model.trainable_state_dict()
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    config = model.config
    meta = {
        "format": FORMAT,
        "prefix_config": config.to_dict(),
        "folded": fold or model.prefix.folded,
        "base_model": fingerprint(model.base),
        "weights_sha256": sha256_file(weights),
    }
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _folded_state(model: PrefixModel) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {f"{name}.table": sp().detach() for name, sp in model.prefix.stacks.items()}


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The saved JSON, checked for format and for matching the weights file beside it."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no prefix config here (is {directory} a prefixtune save?)")
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (the config beside it names weights that are not there)")
    digest = sha256_file(weights)
    if digest != meta.get("weights_sha256"):
        raise ValueError(f"{weights}: sha256 {digest[:12]}… does not match {cfg_path} field 'weights_sha256'")
    return meta


def load(directory: str | Path, model: nn.Module, tokenizer: Any = None) -> PrefixModel:
    """Attach the prefix saved in ``directory`` to ``model`` (refused if it is another base model)."""
    from .model import attach

    directory = Path(directory)
    meta = read_meta(directory)
    compare_fingerprints(meta["base_model"], fingerprint(model), str(directory / CONFIG_NAME))
    config = PrefixConfig.from_dict(meta["prefix_config"], source=f"{directory / CONFIG_NAME}: prefix_config")
    if meta["folded"]:
        config = config.replace(reparam=False)
    pm = attach(model, config.replace(init="random"))
    tensors = load_file(str(directory / WEIGHTS_NAME), device=str(pm.device))
    expected = set(pm.trainable_state_dict())
    if set(tensors) != expected:
        pm.detach()
        raise ValueError(
            f"{directory / WEIGHTS_NAME}: tensors {sorted(tensors)} do not match this prefix's {sorted(expected)}"
        )
    pm.prefix.stacks.load_state_dict(tensors)
    return pm
