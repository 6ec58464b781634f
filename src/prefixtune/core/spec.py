"""What a supported model looks like: its attention stacks, their layers and K/V shapes.

``read_spec(model)`` is the one function that reads these values, from the model's config,
and checks them against the model's own modules. Everything else uses the ``ModelSpec``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

Kind = Literal["causal", "seq2seq", "encoder"]
Stack = Literal["encoder", "decoder", "cross"]


@dataclass(frozen=True)
class StackSpec:
    """One attention stack that can carry a prefix (e.g. the decoder's self-attention)."""

    name: Stack
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @property
    def kv_dim(self) -> int:
        """num_kv_heads × head_dim: the width of one key (or value) vector."""
        return self.num_kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """layers · 2 · kv_dim: the width of one prefix position across the whole stack."""
        return self.num_layers * 2 * self.kv_dim


@dataclass(frozen=True)
class ModelSpec:
    """The values ``prefixtune`` needs from a base model, read once by ``read_spec``."""

    model_type: str
    architecture: str
    kind: Kind
    stacks: tuple[StackSpec, ...]
    hidden_size: int
    vocab_size: int
    shift_positions: bool
    slots: tuple[tuple[str, Stack, int], ...]  # (module path, stack, layer)

    def stack(self, name: str) -> StackSpec:
        for s in self.stacks:
            if s.name == name:
                return s
        raise KeyError(f"{self.architecture} has no '{name}' attention stack (has {[s.name for s in self.stacks]})")


@dataclass(frozen=True)
class _Arch:
    kind: Kind
    patterns: dict[str, str]  # stack -> regex on the module path, group 1 = layer index
    dims: Callable[[Any, str], tuple[int, int, int]]  # (config, stack) -> (layers, kv_heads, head_dim)
    hidden: Callable[[Any], int]


def _gqa_dims(cfg: Any, stack: str) -> tuple[int, int, int]:
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    # The attention classes of these architectures define head_dim this way themselves.
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv, head_dim


def _gpt2_dims(cfg: Any, stack: str) -> tuple[int, int, int]:
    return cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head


def _bart_dims(cfg: Any, stack: str) -> tuple[int, int, int]:
    if stack == "encoder":
        return cfg.encoder_layers, cfg.encoder_attention_heads, cfg.d_model // cfg.encoder_attention_heads
    return cfg.decoder_layers, cfg.decoder_attention_heads, cfg.d_model // cfg.decoder_attention_heads


def _t5_dims(cfg: Any, stack: str) -> tuple[int, int, int]:
    layers = cfg.num_layers if stack == "encoder" else (cfg.num_decoder_layers or cfg.num_layers)
    return layers, cfg.num_heads, cfg.d_kv


def _bert_dims(cfg: Any, stack: str) -> tuple[int, int, int]:
    return cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads


def _distilbert_dims(cfg: Any, stack: str) -> tuple[int, int, int]:
    return cfg.n_layers, cfg.n_heads, cfg.dim // cfg.n_heads


_DECODER_ONLY = _Arch("causal", {"decoder": r"layers\.(\d+)\.self_attn"}, _gqa_dims, lambda c: c.hidden_size)
_BERT_LIKE = _Arch("encoder", {"encoder": r"encoder\.layer\.(\d+)\.attention\.self"}, _bert_dims,
                   lambda c: c.hidden_size)

ARCHITECTURES: dict[str, _Arch] = {
    "llama": _DECODER_ONLY,
    "mistral": _DECODER_ONLY,
    "qwen2": _DECODER_ONLY,
    "qwen3": _DECODER_ONLY,
    "gpt2": _Arch("causal", {"decoder": r"h\.(\d+)\.attn"}, _gpt2_dims, lambda c: c.n_embd),
    "bart": _Arch(
        "seq2seq",
        {
            "encoder": r"encoder\.layers\.(\d+)\.self_attn",
            "decoder": r"decoder\.layers\.(\d+)\.self_attn",
            "cross": r"decoder\.layers\.(\d+)\.encoder_attn",
        },
        _bart_dims,
        lambda c: c.d_model,
    ),
    "t5": _Arch(
        "seq2seq",
        {
            "encoder": r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention",
            "decoder": r"decoder\.block\.(\d+)\.layer\.0\.SelfAttention",
            "cross": r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention",
        },
        _t5_dims,
        lambda c: c.d_model,
    ),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": _Arch("encoder", {"encoder": r"transformer\.layer\.(\d+)\.attention"}, _distilbert_dims,
                        lambda c: c.dim),
}
# Not supported, on purpose: DeBERTa(-v2) computes disentangled relative-position attention inside its own
# attention class (content-to-position and position-to-content terms over the keys), not through transformers'
# attention interface, so prefix keys would need positions of their own; it is refused like any other.


def _key_projection_width(module: nn.Module) -> int | None:
    """Output width of a self-attention module's key projection, where it has a separate one."""
    for name in ("k_proj", "k", "key", "k_lin"):
        proj = getattr(module, name, None)
        if isinstance(proj, nn.Linear):
            return proj.out_features
    return None


def read_spec(model: nn.Module) -> ModelSpec:
    """Read layers, K/V heads and head_dim of every prefix-carrying attention stack of ``model``.

    Raises ValueError naming the architecture when it is not supported, or when the config
    disagrees with the model's own modules.
    """
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    name = type(model).__name__
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"prefixtune does not support the architecture {name} (model_type={model_type!r}); "
            f"supported model types: {sorted(ARCHITECTURES)}"
        )
    arch = ARCHITECTURES[model_type]
    found: dict[str, dict[int, str]] = {stack: {} for stack in arch.patterns}
    compiled = {stack: re.compile(r"(?:^|\.)" + pat + r"$") for stack, pat in arch.patterns.items()}
    modules = dict(model.named_modules())
    for path in modules:
        for stack, rx in compiled.items():
            m = rx.search(path)
            if m:
                found[stack][int(m.group(1))] = path
    stacks: list[StackSpec] = []
    slots: list[tuple[str, Stack, int]] = []
    for stack, by_layer in found.items():
        if not by_layer:
            continue  # e.g. an encoder-only head of a seq2seq model
        layers, kv_heads, head_dim = arch.dims(cfg, stack)
        if sorted(by_layer) != list(range(layers)):
            raise ValueError(
                f"{name}: config says {layers} {stack} layers but the model has attention modules for "
                f"layers {sorted(by_layer)}"
            )
        for layer, path in sorted(by_layer.items()):
            width = _key_projection_width(modules[path])
            if stack != "cross" and width is not None and width != kv_heads * head_dim:
                raise ValueError(
                    f"{name}: {path} projects keys to {width} features, but the config gives "
                    f"{kv_heads} KV heads × head_dim {head_dim} = {kv_heads * head_dim}"
                )
            slots.append((path, stack, layer))  # type: ignore[arg-type]
        stacks.append(StackSpec(stack, layers, kv_heads, head_dim))  # type: ignore[arg-type]
    if not stacks:
        raise ValueError(f"{name}: found no attention modules to attach a prefix to")
    vocab = getattr(cfg, "vocab_size", 0)
    return ModelSpec(
        model_type=model_type,
        architecture=name,
        kind=arch.kind,
        stacks=tuple(stacks),
        hidden_size=arch.hidden(cfg),
        vocab_size=vocab,
        shift_positions=arch.kind == "causal",
        slots=tuple(slots),
    )
