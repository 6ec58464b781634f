"""What Hugging Face tools (Trainer, TRL, accelerate, lm-eval) need from a ``PrefixModel`` beyond ``nn.Module``.

The ``PrefixModel`` methods that these tools call delegate here, so that ``core/model.py`` keeps the method:

- ``state_dict`` / ``load_state_dict`` hold the trainable tensors only (the prefix and the ``train_modules``),
  under their module paths (``prefix.stacks.decoder.table``, ``base.score.weight``). ``Trainer`` saves
  ``model.state_dict()`` into every ``checkpoint-N`` (transformers/trainer.py ``Trainer._save``) and loads it back
  with ``load_state_dict(sd, False)`` on resume and for the best model (``_load_from_checkpoint``,
  ``_load_best_model``); accelerate's ``save_state`` / ``load_state`` do the same. The frozen base model is never
  written, and loading does not report its tensors as missing.
- ``PrefixedBackbone``: TRL's ``SFTTrainer`` patches ``model.forward`` with a fused LM head
  (trl/trainer/utils.py ``add_fused_lm_head``) that calls ``model.base_model(...)`` for the hidden states and
  ``model.get_output_embeddings()`` for the head; the backbone has to run with the prefix applied.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from prefixtune.core.model import PrefixModel


def trainable_keys(pm: PrefixModel) -> list[str]:
    """The ``nn.Module`` state-dict keys of what trains: ``prefix.*`` and ``base.<train_module>.*``."""
    return list(trainable_state(pm, None, "", keep_vars=True))


def trainable_state(pm: PrefixModel, destination: dict[str, Any] | None, prefix: str,
                    keep_vars: bool) -> dict[str, Any]:
    """``pm.state_dict()`` restricted to the trainable tensors (keys as ``nn.Module`` names them), read from
    the prefix and the ``train_modules`` alone: the frozen base model's tensors are never visited."""
    out: dict[str, Any] = OrderedDict() if destination is None else destination
    for name in pm.train_modules:  # in nn.Module's order: ``base`` is registered before ``prefix``
        pm.base.get_submodule(name).state_dict(destination=out, prefix=f"{prefix}base.{name}.", keep_vars=keep_vars)
    pm.prefix.state_dict(destination=out, prefix=f"{prefix}prefix.", keep_vars=keep_vars)
    return out


def load_trainable_state(pm: PrefixModel, state: dict[str, torch.Tensor], strict: bool, assign: bool) -> Any:
    """Load trainable tensors; the base model's absence is not "missing". ``strict`` refuses a state that lacks
    a trainable tensor or holds one this model does not have (e.g. another prefix length or mode)."""
    expected = trainable_keys(pm)
    result = nn.Module.load_state_dict(pm, state, strict=False, assign=assign)
    missing = [k for k in expected if k not in state]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise RuntimeError(f"prefix state: missing trainable tensors {missing}, unexpected tensors {unexpected} "
                           f"(this PrefixModel trains {expected})")
    return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)


def trainable_summary(pm: PrefixModel) -> str:
    """PEFT's one-line count: ``trainable params: N || all params: M || trainable%: X``."""
    trainable = pm.num_trainable_parameters()
    total = sum(p.numel() for p in pm.parameters())
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


class PrefixedBackbone:
    """The base model's backbone (``base.base_model``, e.g. ``LlamaModel``) run with the prefix applied.

    A callable, not a submodule (so the backbone's tensors are not listed twice): what TRL's fused LM head calls
    as ``model.base_model(input_ids=..., attention_mask=..., use_cache=False)``; returns the backbone's output
    (``last_hidden_state``: (B, T, hidden)). The prefix's positions and mask are set up by a pre-hook on the whole
    model, so the whole model runs (its head on the last position only, where it takes ``logits_to_keep``) and
    the backbone's output is taken on the way.
    """

    def __init__(self, pm: PrefixModel):
        self.pm = pm

    @property
    def module(self) -> nn.Module:
        return self.pm.base.base_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.pm.prefix_config.mode == "infix":
            raise ValueError("infix mode needs the labels to place the infix; a fused LM head (TRL's SFTTrainer) "
                             "runs the backbone without them: use mode 'prefix' or 'embedding-only' there")
        if "logits_to_keep" in inspect.signature(self.pm.base.forward).parameters:
            kwargs.setdefault("logits_to_keep", 1)
        seen: list[Any] = []
        handle = self.module.register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            with self.pm.injection.active(self.pm.prefix_batch()):
                self.pm.base(*args, **kwargs)
        finally:
            handle.remove()
        return seen[-1]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)
