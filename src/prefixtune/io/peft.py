"""Exchange prefixes with PEFT's prefix-tuning format (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT stores a causal LM's prefix as ``prompt_embeddings`` of shape [P, layers·2·kv_dim], each
position laid out (layers, 2, kv_heads, head_dim): the same layout as a folded prefixtune
``decoder`` stack, so conversion is a copy. PEFT itself does not need to be installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import PrefixModel, attach
from prefixtune.files import atomic_write, atomic_write_text

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"


def export_peft(model: PrefixModel, directory: str | Path, base_model_name_or_path: str | None = None) -> None:
    """Write ``model``'s prefix as a PEFT prefix-tuning adapter (causal LMs, mode 'prefix')."""
    if model.spec.kind != "causal" or model.prefix_config.mode != "prefix":
        raise ValueError(
            f"PEFT export supports decoder-only models in mode 'prefix'; this is {model.spec.architecture} "
            f"in mode {model.prefix_config.mode!r}"
        )
    stack = model.spec.stack("decoder")
    with torch.no_grad():
        table = model.prefix.stacks["decoder"]().detach().to("cpu", torch.float32).contiguous()
    directory = Path(directory)
    atomic_write(directory / PEFT_WEIGHTS, lambda tmp: save_file({PEFT_KEY: table}, str(tmp)))
    config: dict[str, Any] = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": table.shape[0],
        "token_dim": stack.kv_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": stack.num_kv_heads,
        "num_layers": stack.num_layers,
        "encoder_hidden_size": stack.kv_dim,
        "prefix_projection": False,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
    }
    atomic_write_text(directory / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")


def import_peft(directory: str | Path, model: nn.Module) -> PrefixModel:
    """Attach a PEFT prefix-tuning adapter saved in ``directory`` to ``model``."""
    directory = Path(directory)
    cfg_path = directory / PEFT_CONFIG
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{cfg_path}: missing (is {directory} a PEFT adapter?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path}: not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{cfg_path}: field 'peft_type' is {cfg.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    weights = directory / PEFT_WEIGHTS
    tensors = load_file(str(weights))
    if PEFT_KEY not in tensors:
        raise ValueError(f"{weights}: no tensor '{PEFT_KEY}' (has {sorted(tensors)})")
    table = tensors[PEFT_KEY]
    pm = attach(model, PrefixConfig(prefix_length=table.shape[0], reparam=False))
    stack = pm.spec.stack("decoder")
    if table.shape[1] != stack.width or cfg.get("num_layers", stack.num_layers) != stack.num_layers:
        pm.detach()
        raise ValueError(
            f"{weights}: '{PEFT_KEY}' has shape {list(table.shape)} (num_layers={cfg.get('num_layers')}), "
            f"but {pm.spec.architecture} needs [P, {stack.num_layers}·2·{stack.kv_dim} = {stack.width}]"
        )
    with torch.no_grad():
        pm.prefix.stacks["decoder"].table.copy_(table)
    return pm
