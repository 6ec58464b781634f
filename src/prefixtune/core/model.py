"""A frozen base model plus a trainable prefix: forward, loss, generate, fold."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefixtune.core.checkpoint import WEIGHTS_NAME, check_keys, fingerprint, read_prefix, save_prefix
from prefixtune.core.config import PrefixConfig
from prefixtune.core.hf import PrefixedBackbone, load_trainable_state, trainable_state, trainable_summary
from prefixtune.core.inject import Injection, PrefixBatch
from prefixtune.core.kv import as_kv, flatten_kv
from prefixtune.core.prefix import PrefixEncoder, enabled_stacks
from prefixtune.core.spec import ModelSpec, read_spec


class PrefixModel(nn.Module):
    """A frozen ``transformers`` model with a prefix at every attention layer.

    ``forward`` takes and returns what the base model does; ``generate`` takes the same
    arguments as ``transformers``' ``generate``. Only ``self.prefix`` is trainable.
    """

    def __init__(self, base: nn.Module, config: PrefixConfig, spec: ModelSpec, injection: Injection,
                 train_modules: Sequence[str] = ()):
        super().__init__()
        self.base = base
        self.spec = spec
        self.injection = injection
        self.prefix = PrefixEncoder(config, spec)
        self.train_modules = tuple(train_modules)
        self.enabled = True
        self._base_fingerprint: dict[str, Any] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def prefix_config(self) -> PrefixConfig:
        """How this prefix is shaped and trained."""
        return self.prefix.config

    @property
    def config(self) -> Any:
        """The base model's ``transformers`` config (what Hugging Face tools read from a model)."""
        return self.base.config

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ the prefix
    def prefix_batch(self, infix_start: torch.Tensor | None = None) -> PrefixBatch | None:
        """Compute this call's prefix K/V (None when disabled or of length 0).

        infix_start: (B,) base position of each row's first token that sees the infix
        (infix mode only).
        """
        if not self.enabled or self.prefix_config.prefix_length == 0:
            return None
        p = self.prefix_config.prefix_length
        outputs = self.prefix()
        if self.prefix_config.mode == "embedding-only":
            virtual = outputs["embedding"][None].to(self.base.dtype)  # (1, P, hidden)
            collected = self.injection.collect_kv(inputs_embeds=virtual)  # decoder-only (attach checks)
            kv = {}
            for stack in enabled_stacks(self.prefix_config, self.spec):
                layers = self.spec.stack(stack).num_layers
                flat = flatten_kv([collected[(stack, layer)] for layer in range(layers)])
                kv[stack] = as_kv(flat, self.spec, stack)
        else:
            kv = {name: as_kv(flat, self.spec, name) for name, flat in outputs.items()}
        lengths = torch.tensor([p], device=self.device) if self.spec.shift_positions else None
        if self.prefix_config.mode == "infix":
            if infix_start is None:
                raise ValueError("infix mode needs infix_start (or labels) to know where the target starts")
            return PrefixBatch(kv=kv, lengths=lengths, infix_start=infix_start)
        return PrefixBatch(kv=kv, lengths=lengths)

    @torch.no_grad()
    def decoder_kv(self) -> torch.Tensor | None:
        """One row's decoder keys/values, (P, layers, 2, kv_heads, head_dim), as a KV cache of P past
        tokens would hold them (no dropout); None when disabled or of length 0. Decoder-only models,
        prefix and embedding-only modes (what the serving engine takes)."""
        if self.spec.kind != "causal" or self.prefix_config.mode == "infix":
            raise ValueError(f"only prefixes in front of a decoder-only model are K/V of past tokens; this is "
                             f"mode {self.prefix_config.mode!r} on {self.spec.architecture}")
        was_training = self.prefix.training  # only the prefix: self.train() would also switch the base model
        self.prefix.eval()
        try:
            batch = self.prefix_batch()
        finally:
            self.prefix.train(was_training)
        return None if batch is None else batch.kv["decoder"][0]

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the bare base model inside the block."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    # ------------------------------------------------------------------ forward / generate
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        infix_start: torch.Tensor | None = None,
        row_prefixes: Sequence[torch.Tensor | None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Same as the base model's forward; input_ids / attention_mask / labels are (B, T).

        row_prefixes: one decoder prefix per row instead of this model's own (several saved prefixes in
        one batch): each (P_r, layers, 2, kv_heads, head_dim) from ``load_prefix_kv`` / ``decoder_kv``, or None.
        """
        if self.prefix_config.mode == "infix" and infix_start is None and labels is not None:
            infix_start = infix_start_from_labels(labels, attention_mask)
        batch = self._row_batch(row_prefixes) if row_prefixes is not None else self.prefix_batch(infix_start)
        with self.injection.active(batch):
            return self.base(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    def _row_batch(self, rows: Sequence[torch.Tensor | None]) -> PrefixBatch:
        if self.spec.kind != "causal":
            raise ValueError(f"row_prefixes are prefixes of a decoder-only model, not of {self.spec.architecture}")
        return PrefixBatch.from_rows(rows, self.device, self.base.dtype)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None,
                 row_prefixes: Sequence[torch.Tensor | None] | None = None, **kwargs: Any) -> torch.Tensor:
        """``transformers`` generate with the prefix applied at every step (greedy, sampling, beams).

        Decoder-only batches should be left-padded; positions are taken from the attention mask.
        row_prefixes: one prefix per row, as in ``forward``.
        """
        kwargs = self._own_positions(input_ids, kwargs)
        if row_prefixes is not None:
            with self.injection.active(self._row_batch(row_prefixes)):
                return self.base.generate(input_ids=input_ids, **kwargs)
        infix_start = None
        if self.prefix_config.mode == "infix":
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones_like(input_ids)
            infix_start = mask.long().sum(-1) - 1  # the last prompt token sees the infix
        batch = self.prefix_batch(infix_start)
        with self.injection.active(batch):
            return self.base.generate(input_ids=input_ids, **kwargs)

    def _own_positions(self, input_ids: torch.Tensor | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """RoBERTa-like models number positions from padding_idx + 1 in their forward, but ``generate`` passes
        position_ids 0, 1, ... of its own: the prefix (made by forward) and the tokens after it would then sit at
        positions of two numberings. Pass the model's own, (B, T) from the attention mask (padding: padding_idx)."""
        pad = self.spec.position_padding_idx
        if pad is None or input_ids is None or kwargs.get("position_ids") is not None:
            return kwargs
        mask = kwargs.get("attention_mask")
        real = (input_ids != pad) if mask is None else mask.bool()
        return {**kwargs, "position_ids": real.long().cumsum(-1) * real + pad}

    # ------------------------------------------------------------------ training helpers
    def fold(self) -> PrefixModel:
        """Replace the reparameterization MLP by the prefix it computes (logits unchanged)."""
        self.prefix.fold()
        return self

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        **kwargs: Any) -> None:
        """Checkpoint the base model's layers (non-reentrant unless ``use_reentrant`` says otherwise; the prefix's
        gradients are the same either way). Trainer calls this (``args.activation_checkpointing``)."""
        self.base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, **(activation_checkpointing_kwargs or {})},
            **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict[str, Any] | None = None,
                                      **kwargs: Any) -> None:
        """The older name of ``activation_checkpointing_enable`` (what PEFT models and TRL call)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.base.activation_checkpointing_disable()

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return self.base.is_activation_checkpointing

    is_gradient_checkpointing = is_activation_checkpointing

    # ------------------------------------------------------------------ Hugging Face surface (see core/hf.py)
    main_input_name = "input_ids"
    _keys_to_ignore_on_save = None  # Trainer._issue_warnings_after_load reads it

    @property
    def name_or_path(self) -> str:
        """The base model's name or folder (TRL names runs and finds the tokenizer by it)."""
        return self.base.name_or_path

    @property
    def generation_config(self) -> Any:
        return self.base.generation_config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.base.generation_config = value

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def base_model(self) -> PrefixedBackbone:
        """The backbone with the prefix applied: what TRL's fused LM head calls for hidden states."""
        return PrefixedBackbone(self)

    def can_generate(self) -> bool:
        return self.base.can_generate()

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.base.get_output_embeddings()

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        self.base.tie_weights(*args, **kwargs)

    def add_model_tags(self, tags: list[str] | str) -> None:
        self.base.add_model_tags(tags)

    def enable_input_require_grads(self) -> None:
        """Make the embeddings' output require grad (TRL calls it for PEFT models; the prefix's gradients flow
        without it, with or without checkpointing)."""
        self.base.enable_input_require_grads()

    def disable_input_require_grads(self) -> None:
        self.base.disable_input_require_grads()

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.base.prepare_inputs_for_generation(*args, **kwargs)

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count; Trainer's FLOP estimate reads ``num_parameters(exclude_embeddings=True)``."""
        if only_trainable:
            return self.num_trainable_parameters()
        prefix = sum(p.numel() for p in self.prefix.parameters())
        return self.base.num_parameters(exclude_embeddings=exclude_embeddings) + prefix

    def print_trainable_parameters(self) -> None:
        print(trainable_summary(self))

    def state_dict(self, *, destination: dict[str, Any] | None = None, prefix: str = "",
                   keep_vars: bool = False) -> dict[str, Any]:
        """The trainable tensors only (prefix, ``train_modules``), keyed by module path: what Trainer's
        checkpoints and accelerate's ``save_state`` hold. The frozen base model is not in it."""
        return trainable_state(self, destination, prefix, keep_vars)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load what ``state_dict()`` gives; the base model's tensors are not expected."""
        return load_trainable_state(self, state_dict, strict, assign)

    @classmethod
    def from_pretrained(cls, directory: str | Path, model: nn.Module, tokenizer: Any = None) -> PrefixModel:
        """``load(directory, model)``: the saved prefix on ``model`` (refused if it is another base model)."""
        return load(directory, model, tokenizer)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Exactly what trains (and is saved): the prefix tensors ``{"<stack>.table" | MLP keys}`` and
        those of the ``train_modules`` (e.g. a classification head) as ``module.<name>.<key>``."""
        out = {k.removeprefix("stacks."): v for k, v in self.prefix.state_dict().items()}
        out.update(self.module_state_dict())
        return out

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """The ``train_modules``' tensors, keyed ``module.<name>.<key>``."""
        return {f"module.{name}.{k}": v for name in self.train_modules
                for k, v in self.base.get_submodule(name).state_dict().items()}

    def load_module_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        for name in self.train_modules:
            prefix = f"module.{name}."
            sub = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            self.base.get_submodule(name).load_state_dict(sub)

    def save_pretrained(self, directory: str | Path, fold: bool = True) -> None:
        """Save the prefix (folded unless ``fold=False``), its config and the base fingerprint."""
        if fold:
            with torch.no_grad():
                tensors = {f"{name}.table": sp().detach() for name, sp in self.prefix.stacks.items()}
            tensors.update(self.module_state_dict())
        else:
            tensors = self.trainable_state_dict()
        save_prefix(directory, tensors, self.prefix_config, folded=fold or self.prefix.folded,
                    train_modules=self.train_modules, base_fingerprint=self.base_fingerprint())

    def base_fingerprint(self) -> dict[str, Any]:
        """The frozen base model's fingerprint (``core.checkpoint.fingerprint``), taken once and kept: the base
        does not train. Take it before sharding the base (FSDP), whose shards cannot be fingerprinted alone."""
        if self._base_fingerprint is None:
            self._base_fingerprint = fingerprint(self.base, exclude=self.train_modules)
        return self._base_fingerprint

    def detach(self) -> nn.Module:
        """Remove the prefix machinery and return the untouched base model."""
        self.injection.remove()  # also gives every base parameter back its requires_grad from before attach
        return self.base


def infix_start_from_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) base position of the token that predicts each row's first target token.

    labels: (B, T) with -100 on source tokens; attention_mask: (B, T) or None.
    """
    is_target = labels != -100
    if not bool(is_target.any(-1).all()):
        raise ValueError("infix mode: a row of labels has no target token (all -100)")
    first = is_target.int().argmax(-1)  # (B,)
    if attention_mask is None:
        return first - 1
    positions = attention_mask.long().cumsum(-1) - 1  # base position of each token
    return positions.gather(1, (first - 1).clamp(min=0)[:, None])[:, 0]


def attach(
    model: nn.Module,
    config: PrefixConfig | None = None,
    tokenizer: Any = None,
    train_modules: Sequence[str] = (),
) -> PrefixModel:
    """Freeze ``model`` and give it a trainable prefix; returns the ``PrefixModel``.

    With ``config.init = "text:<words>"`` the prefix starts as the frozen model's own K/V of
    those words (``tokenizer`` required) and its length becomes their token count.
    ``train_modules`` names submodules that train (and are saved) with the prefix, e.g. a
    classification head (``"classifier"``).
    """
    config = config or PrefixConfig()
    spec = read_spec(model)
    if config.mode != "prefix" and spec.kind != "causal":
        raise ValueError(f"mode {config.mode!r} is implemented for decoder-only models, not {spec.architecture}")
    names = dict(model.named_modules())
    missing = [n for n in train_modules if not n or n not in names]
    if missing:
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"{spec.architecture} has no module(s) {missing} to train; its top-level modules: {top}")
    injection = Injection(model, spec)  # remembers each parameter's requires_grad; remove() restores them
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for name in train_modules:
            for p in names[name].parameters():
                p.requires_grad_(True)
        init_kv = None
        if config.init_text:
            if tokenizer is None:
                raise ValueError(f"init {config.init!r} needs the model's tokenizer: attach(model, config, tokenizer)")
            init_kv = _text_activations(model, injection, spec, config, tokenizer)
            config = config.replace(prefix_length=next(iter(init_kv.values())).shape[0])
        pm = PrefixModel(model, config, spec, injection, train_modules)
        param = next(model.parameters())
        pm.prefix.to(device=param.device)
        if init_kv is not None:
            for name, target in init_kv.items():
                pm.prefix.stacks[name].init_to(target.to(param.device))
    except Exception:
        injection.remove()
        raise
    return pm


@torch.no_grad()
def _text_activations(
    model: nn.Module, injection: Injection, spec: ModelSpec, config: PrefixConfig, tokenizer: Any
) -> dict[str, torch.Tensor]:
    """Each enabled stack's K/V of the init words, (T, layers·2·kv_dim)."""
    ids = tokenizer(config.init_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise ValueError(f"init text {config.init_text!r} tokenizes to no tokens")
    ids = ids.to(next(model.parameters()).device)
    inputs: dict[str, torch.Tensor] = {"input_ids": ids}
    if spec.kind == "seq2seq":
        inputs["decoder_input_ids"] = ids
    was_training = model.training
    model.eval()
    try:
        collected = injection.collect_kv(**inputs)
    finally:
        model.train(was_training)
    out = {}
    for stack in enabled_stacks(config, spec):
        layers = spec.stack(stack).num_layers
        out[stack] = flatten_kv([collected[(stack, layer)] for layer in range(layers)]).float()
    return out


def load(directory: str | Path, model: nn.Module, tokenizer: Any = None) -> PrefixModel:
    """Attach the prefix saved in ``directory`` to ``model`` (refused if it is another base model)."""
    directory = Path(directory)
    config, tensors, train_modules = read_prefix(directory, model)
    pm = attach(model, config, train_modules=train_modules)
    expected = pm.trainable_state_dict()
    try:
        check_keys(directory, tensors, set(expected))
        wrong = [k for k, v in tensors.items() if v.shape != expected[k].shape]
        if wrong:
            raise ValueError(f"{directory / WEIGHTS_NAME}: tensors {wrong} have other shapes than this model needs "
                             f"({[list(expected[k].shape) for k in wrong]}), e.g. another number of labels")
    except ValueError:
        pm.detach()
        raise
    pm.prefix.stacks.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("module.")})
    pm.load_module_state_dict(tensors)
    return pm
