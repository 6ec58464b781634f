"""The training loop's settings: one frozen, validated dataclass (its fields generate the CLI's flags)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from prefixtune.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings. ``batch_size`` is per rank; an optimizer step sees
    ``batch_size × ranks × grad_accum`` examples (``ranks`` = 1 without ``torchrun``).

    Attributes:
        epochs: passes over the training examples (fractions allowed).
        max_steps: stop after this many optimizer steps ('none': no bound).
        batch_size: examples per rank per micro-step; a step sees batch-size × ranks × grad-accum.
        grad_accum: micro-steps (global batches) per optimizer step.
        lr: AdamW learning rate (linear warm-up, then linear decay to 0).
        warmup_steps: optimizer steps of linear warm-up.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradients are clipped to this norm.
        seed: seeds the data order, the prefix init and dropout.
        precision: fp32, or bf16 autocast.
        gradient_checkpointing: recompute the base model's activations in the backward pass.
        eval_every: dev loss every N steps (keeps the best prefix; 'none': at the end only).
        early_stopping: stop after this many dev evaluations without improvement ('none': never).
        log_every: a log line every N steps.
        checkpoint_every: write the resume state every N steps (and at every evaluation).
        group_by_length: batches of examples of similar length (fewer pad tokens, as transformers' Trainer
            ``group_by_length``): each epoch's shuffle is cut into chunks of ``LENGTH_GROUP_BATCHES`` batches,
            each chunk sorted by length, and the batches shuffled again.
    """

    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    eval_every: int | None = None
    early_stopping: int | None = None
    log_every: int = 10
    checkpoint_every: int = 20
    group_by_length: bool = False

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs > 0,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "weight_decay": self.weight_decay >= 0,
            "max_grad_norm": self.max_grad_norm > 0,
            "precision": self.precision in ("fp32", "bf16"),
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "eval_every": self.eval_every is None or self.eval_every >= 1,
            "early_stopping": self.early_stopping is None or self.early_stopping >= 1,
            "log_every": self.log_every >= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"TrainConfig: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    def total_steps(self, num_examples: int, world_size: int = 1) -> int:
        """Optimizer steps for ``num_examples`` training examples on ``world_size`` ranks."""
        per_epoch = math.ceil(num_examples / (self.batch_size * world_size) / self.grad_accum)
        steps = math.ceil(per_epoch * self.epochs)
        return min(steps, self.max_steps) if self.max_steps else steps
