"""Saving and loading prefixes: safetensors + JSON, atomic writes, base-model fingerprints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from prefixtune.core.config import PrefixConfig
from prefixtune.core.kv import as_kv
from prefixtune.core.prefix import PrefixEncoder
from prefixtune.core.spec import read_spec
from prefixtune.files import atomic_write, atomic_write_text, sha256_file

FORMAT = "prefixtune/1"
CONFIG_NAME = "prefix_config.json"
WEIGHTS_NAME = "prefix.safetensors"


SAMPLES_PER_TENSOR = 1024  # strided elements hashed per tensor: bounded time (~1 ms a tensor) even for 70B models


def _legacy_weights_sha256(model: nn.Module, spec: Any) -> str:
    """The first format's hash (64 embedding rows + 8 rows of the last attention layer's first weight)."""
    emb = model.get_input_embeddings().weight
    h = hashlib.sha256(emb[: min(64, emb.shape[0])].detach().float().cpu().contiguous().numpy().tobytes())
    last = next(p for p in model.get_submodule(spec.slots[-1][0]).parameters() if p.ndim == 2)
    h.update(last[:8].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def tensors_sha256(model: nn.Module, exclude: Sequence[str] = ()) -> str:
    """sha256 over every parameter and buffer of ``model`` (name, shape, and a sample of
    ``SAMPLES_PER_TENSOR`` elements spread evenly over the whole tensor, so a changed row is seen),
    except those under ``exclude`` (modules that train with the prefix, e.g. a new classification head).
    Tied weights count once."""
    h = hashlib.sha256()
    skip = tuple(f"{name}." for name in exclude)
    seen: set[int] = set()
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in sorted(named, key=lambda item: item[0]):
        if name.startswith(skip) or id(t) in seen or t.is_meta:
            continue
        seen.add(id(t))
        if isinstance(t, DTensor):
            raise ValueError(f"cannot fingerprint {name}: it is sharded (FSDP); take the fingerprint before "
                             "sharding (PrefixModel.base_fingerprint() keeps it)")
        flat = t.detach().reshape(-1)
        n, k = flat.numel(), min(flat.numel(), SAMPLES_PER_TENSOR)
        index = torch.arange(k, device=flat.device) * (n - 1) // max(k - 1, 1)  # int64: exact for any size
        sample = flat[index].float().cpu().contiguous()  # evenly spread, first and last element included
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def fingerprint(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """What identifies a base model: architecture, shapes, and a hash of a sample of every tensor
    (``tensors_sha256``; ``exclude`` names modules that are saved with the prefix)."""
    spec = read_spec(model)
    return {
        "architecture": spec.architecture,
        "model_type": spec.model_type,
        "stacks": {s.name: {"layers": s.num_layers, "kv_heads": s.num_kv_heads, "head_dim": s.head_dim}
                   for s in spec.stacks},
        "hidden_size": spec.hidden_size,
        "vocab_size": spec.vocab_size,
        "weights_sha256": _legacy_weights_sha256(model, spec),
        "tensors_sha256": tensors_sha256(model, exclude),
        "excluded": sorted(exclude),
    }


def compare_fingerprints(saved: dict[str, Any], actual: dict[str, Any], where: str) -> None:
    """Raise ValueError listing every field where the saved base model differs from ``actual``.

    Architecture names may differ (a prefix saved on ``LlamaForCausalLM`` loads on ``LlamaModel``)
    as long as everything else agrees. Saves of the first format (no ``tensors_sha256``) are
    compared on what they recorded (embedding rows and one weight), so they keep loading.
    """
    keys = ["model_type", "stacks", "hidden_size", "vocab_size", "weights_sha256"]
    if "tensors_sha256" in saved:
        keys.append("tensors_sha256")
    diffs = [f"{key}: saved {saved.get(key)!r}, this model {actual.get(key)!r}" for key in keys
             if saved.get(key) != actual.get(key)]
    if "tensors_sha256" in saved and saved.get("excluded", []) != actual.get("excluded", []):
        diffs.append(f"excluded modules: saved {saved.get('excluded')}, here {actual.get('excluded')}")
    if diffs:
        raise ValueError(
            f"{where}: this prefix was trained on a different base model "
            f"({saved.get('architecture')}); differences: " + "; ".join(diffs)
        )


def save_prefix(directory: str | Path, tensors: dict[str, torch.Tensor], config: PrefixConfig, *, folded: bool,
                train_modules: tuple[str, ...], base_fingerprint: dict[str, Any]) -> None:
    """Write ``prefix.safetensors`` (``tensors``, stored as float32) and ``prefix_config.json``, atomically.

    ``folded`` says whether the tensors are the computed prefix (``<stack>.table``) or the MLP's;
    ``base_fingerprint`` (``fingerprint(base)``) is stored so that the prefix is refused on another base model.
    """
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    weights = directory / WEIGHTS_NAME
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT}))
    meta = {
        "format": FORMAT,
        "prefix_config": config.to_dict(),
        "folded": folded,
        "train_modules": list(train_modules),
        "base_model": base_fingerprint,
        "weights_sha256": sha256_file(weights),
    }
    atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2, sort_keys=True) + "\n")


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


def read_prefix(directory: Path, model: nn.Module, base_fingerprint: dict[str, Any] | None = None
                ) -> tuple[PrefixConfig, dict[str, torch.Tensor], list[str]]:
    """The checked config, tensors (on the model's device) and trained module names saved in ``directory``.

    ``base_fingerprint``: ``fingerprint(model)`` already taken by the caller (a registry loading many prefixes
    of one frozen model), used when it excludes the same modules as the save; otherwise it is taken here."""
    meta = read_meta(directory)
    exclude = meta["base_model"].get("excluded", meta.get("train_modules", []))
    actual = base_fingerprint
    if actual is None or actual.get("excluded") != sorted(exclude):
        actual = fingerprint(model, exclude=exclude)
    compare_fingerprints(meta["base_model"], actual, str(directory / CONFIG_NAME))
    config = PrefixConfig.from_dict(meta["prefix_config"], source=f"{directory / CONFIG_NAME}: prefix_config")
    if meta["folded"]:
        config = config.replace(reparam=False)
    device = next(model.parameters()).device
    tensors = load_file(str(directory / WEIGHTS_NAME), device=str(device))
    return config.replace(init="random"), tensors, list(meta.get("train_modules", []))


def check_keys(directory: Path, tensors: dict[str, torch.Tensor], expected: set[str]) -> None:
    if set(tensors) != expected:
        raise ValueError(
            f"{directory / WEIGHTS_NAME}: tensors {sorted(tensors)} do not match this prefix's {sorted(expected)}"
        )


@torch.no_grad()
def load_prefix_kv(directory: str | Path, model: nn.Module, base_fingerprint: dict[str, Any] | None = None
                   ) -> torch.Tensor:
    """The decoder keys/values of the prefix saved in ``directory``, without attaching it to ``model``
    (``base_fingerprint``: as in ``read_prefix``).

    Returns (P, layers, 2, kv_heads, head_dim) in the model's dtype (what ``PrefixBatch.kv["decoder"]``
    holds for one row). Decoder-only models and ``mode="prefix"`` only: an embedding-only prefix needs
    the model to compute its K/V (``load(...).prefix_batch()``), and an infix does not sit in front.
    """
    directory = Path(directory)
    config, tensors, _ = read_prefix(directory, model, base_fingerprint)
    spec = read_spec(model)
    if spec.kind != "causal" or config.mode != "prefix":
        raise ValueError(f"{directory / CONFIG_NAME}: only mode 'prefix' on a decoder-only model can be read as "
                         f"K/V directly; this is mode {config.mode!r} on {spec.architecture}")
    with torch.random.fork_rng(devices=[]):  # the encoder's random init must not move the global RNG
        encoder = PrefixEncoder(config, spec)
    check_keys(directory, tensors, {f"{name}.{key}" for name, sp in encoder.stacks.items()
                                     for key in sp.state_dict()})
    encoder.stacks.load_state_dict(tensors)
    encoder.to(tensors[next(iter(tensors))].device).eval()
    flat = encoder()["decoder"]
    param = next(model.parameters())
    return as_kv(flat, spec, "decoder")[0].to(dtype=param.dtype)
