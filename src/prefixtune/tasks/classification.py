"""P-tuning v2 for understanding tasks: a frozen encoder with deep prompts and a small trained head.

``attach_classifier`` loads ``AutoModelForSequenceClassification`` (or ``...ForTokenClassification``)
for an encoder, freezes it, gives every layer a prefix, and trains the task head with it; the
head is saved with the prefix (``train_modules``), still as safetensors + JSON with the base
model's fingerprint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import PrefixModel, attach
from prefixtune.tasks.data import pad_rows
from prefixtune.tasks.glue import ClassExample

HEADS: dict[str, tuple[str, ...]] = {"distilbert": ("pre_classifier", "classifier")}
DEFAULT_HEAD = ("classifier",)


def head_modules(model: nn.Module) -> tuple[str, ...]:
    """Names of the task-head submodules of a transformers classification model."""
    return HEADS.get(model.config.model_type, DEFAULT_HEAD)


def attach_classifier(model: nn.Module, config: PrefixConfig) -> PrefixModel:
    """Freeze ``model`` (a ...ForSequence/TokenClassification encoder), add a prefix, train its head."""
    return attach(model, config, train_modules=head_modules(model))


@dataclass(frozen=True)
class EncodedClass:
    input_ids: list[int]
    token_type_ids: list[int] | None  # None when the tokenizer/model uses no segment ids (DistilBERT, RoBERTa)
    label: int
    where: str = ""


def encode_examples(tokenizer: Any, examples: Sequence[ClassExample], max_length: int = 128) -> list[EncodedClass]:
    """Tokenize texts (and pairs), truncating the longest part to ``max_length`` tokens."""
    out = []
    for ex in examples:
        enc = tokenizer(ex.text, ex.text_pair, truncation=True, max_length=max_length)
        out.append(EncodedClass(enc["input_ids"], enc.get("token_type_ids"), ex.label, ex.where))
    return out


def collate_classes(batch: Sequence[EncodedClass], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``token_type_ids`` (where used) (B, T); ``labels`` (B,)."""
    out = {
        "input_ids": pad_rows([b.input_ids for b in batch], pad_id, "right"),
        "attention_mask": pad_rows([[1] * len(b.input_ids) for b in batch], 0, "right"),
        "labels": torch.tensor([b.label for b in batch], dtype=torch.long),
    }
    if all(b.token_type_ids is not None for b in batch):
        out["token_type_ids"] = pad_rows([b.token_type_ids for b in batch], 0, "right")
    return out


@torch.no_grad()
def predict(model: nn.Module, encoded: Sequence[EncodedClass], pad_id: int, batch_size: int = 64) -> list[int]:
    """Predicted class ids, in order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    preds: list[int] = []
    try:
        for i in range(0, len(encoded), batch_size):
            batch = collate_classes(encoded[i : i + batch_size], pad_id)
            batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            preds.extend(logits.argmax(-1).tolist())
    finally:
        model.train(was_training)
    return preds


def classification_metrics(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Accuracy, macro F1, and Matthews correlation (multi-class form) of class ids."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    classes = sorted(set(labels) | set(predictions))
    k = {c: i for i, c in enumerate(classes)}
    conf = [[0] * len(classes) for _ in classes]
    for p, y in zip(predictions, labels, strict=True):
        conf[k[y]][k[p]] += 1
    n = len(labels)
    correct = sum(conf[i][i] for i in range(len(classes)))
    f1s = []
    for i in range(len(classes)):
        tp = conf[i][i]
        pred_i = sum(conf[r][i] for r in range(len(classes)))
        true_i = sum(conf[i])
        f1s.append(2 * tp / (pred_i + true_i) if pred_i + true_i else 0.0)
    t = [sum(row) for row in conf]
    p = [sum(conf[r][c] for r in range(len(classes))) for c in range(len(classes))]
    cov = correct * n - sum(ti * pi for ti, pi in zip(t, p, strict=True))
    denom = math.sqrt(n * n - sum(pi * pi for pi in p)) * math.sqrt(n * n - sum(ti * ti for ti in t))
    return {"accuracy": correct / n, "macro_f1": sum(f1s) / len(f1s), "mcc": cov / denom if denom else 0.0}
