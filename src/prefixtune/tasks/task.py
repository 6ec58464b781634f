"""The interface every task implements, so that one job per verb (train, evaluate, score, generate) serves all.

Two implementations: table-to-text generation (``generation.GenerationTask``, a decoder-only LM) and
classification (``classification.ClassificationTask``, P-tuning v2 on an encoder). A job calls, in order:
``read`` the records of a split, ``load_model`` + ``attach``, ``encode`` them, ``collate`` batches (the
training loop), and for evaluation ``eval_set`` → ``predict`` → ``score``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import PrefixModel
from prefixtune.errors import ConfigError


@dataclass(frozen=True)
class DecodeConfig:
    """How a trained model produces its outputs in ``eval`` and ``generate``.

    Attributes:
        beams: beam width (1: greedy); generation only.
        max_new_tokens: most tokens generated per source; generation only.
        batch_size: sources (or examples) per forward pass.
    """

    beams: int = 1
    max_new_tokens: int = 64
    batch_size: int = 16

    def __post_init__(self) -> None:
        bad = [f"{k}={getattr(self, k)!r}" for k in ("beams", "max_new_tokens", "batch_size")
               if isinstance(getattr(self, k), bool) or not isinstance(getattr(self, k), int) or getattr(self, k) < 1]
        if bad:
            raise ConfigError(f"DecodeConfig: invalid {', '.join(bad)} (each must be an integer >= 1)")


class Task(Protocol):
    """One task: its records, how they become batches, how a model's outputs are produced and scored.

    ``spec`` is the task's frozen data config (saved as ``run.json``'s ``"data"``); ``kind`` names the task
    in ``run.json`` (``"task"``); ``unit`` names what evaluation counts (``"sources"``, ``"examples"``).
    """

    kind: ClassVar[str]
    unit: ClassVar[str]
    spec: Any

    @property
    def labels(self) -> tuple[str, ...] | None:
        """Class names (index = class id) once known; None for tasks without classes."""

    def read(self, split: str) -> list[Any]:
        """The records of ``split``, in file order (strict: bad rows raise ``DataError``)."""

    def load_model(self, model_name: str) -> tuple[nn.Module, Any]:
        """The base model for this task (a new head where it has one) and its tokenizer."""

    def attach(self, model: nn.Module, prefix: PrefixConfig, tokenizer: Any) -> PrefixModel:
        """Freeze ``model`` and give it a trainable prefix (and head, where the task trains one)."""

    def encode(self, tokenizer: Any, records: Sequence[Any], *, training: bool) -> tuple[list[Any], int]:
        """Token ids of ``records``, and how many were cut or skipped for length (``training`` applies the
        spec's too-long policy; otherwise over-long ones are truncated)."""

    def collate(self, batch: Sequence[Any], pad_id: int) -> dict[str, torch.Tensor]:
        """A padded batch: ``input_ids``, ``attention_mask`` (B, T), ``labels`` (B, T) or (B,)."""

    def pad_id(self, tokenizer: Any) -> int:
        """The id that pads batches."""

    def fingerprint_rows(self, records: Sequence[Any]) -> list[tuple[str, ...]]:
        """The content of each record that a run's data fingerprint hashes."""

    def eval_set(self, split: str, limit: int | None) -> tuple[list[Any], list[Any]]:
        """What evaluation predicts from (sources / examples) and the reference of each (first ``limit``)."""

    def predict(self, model: nn.Module, tokenizer: Any, inputs: Sequence[Any], decode: DecodeConfig,
                progress: bool = False) -> list[str]:
        """One output string per input, in order (generated text, or a label name)."""

    def score(self, predictions: Sequence[str], references: Sequence[Any]) -> dict[str, float | None]:
        """The task's metrics of ``predictions`` against ``references``."""

    def decode_record(self, decode: DecodeConfig) -> dict[str, Any]:
        """The decoding settings worth recording beside the metrics."""
