"""P-tuning v2 for understanding tasks as a `Task`: a frozen encoder with deep prompts and a small trained head.

``attach_classifier`` loads ``AutoModelForSequenceClassification`` (or ``...ForTokenClassification``)
for an encoder, freezes it, gives every layer a prefix, and trains the task head with it; the
head is saved with the prefix (``train_modules``), still as safetensors + JSON with the base
model's fingerprint.

``ClassifySpec.pooling`` picks the head type: ``cls`` is the architecture's own head (it reads the
first token's vector), ``mean`` a linear classifier on the mean of the last hidden states over the
real tokens (``MeanPoolingClassifier``), the pooling sentence encoders such as all-MiniLM-L6-v2 were
trained with. The choice is a spec field, so it is a CLI flag (``--pooling``) and a config key, and the
run record keeps it: loading a run rebuilds the same head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import PrefixModel, attach
from prefixtune.errors import ConfigError
from prefixtune.io.hub import resolve_model
from prefixtune.tasks.encoding import pad_rows
from prefixtune.tasks.generation import check_spec_fields
from prefixtune.tasks.glue import ClassExample, load_classification
from prefixtune.tasks.metrics.classification import classification_metrics
from prefixtune.tasks.task import DecodeConfig

__all__ = ["HEADS", "POOLINGS", "ClassificationTask", "ClassifierOutput", "ClassifySpec", "EncodedClass",
           "MeanPoolingClassifier", "Pooling", "attach_classifier", "classification_metrics", "collate_classes",
           "encode_examples", "head_modules", "load_classifier_base", "masked_mean", "predict"]

# the task-head submodules of a transformers classification model, by model type (default: "classifier")
HEADS: Mapping[str, tuple[str, ...]] = {"distilbert": ("pre_classifier", "classifier")}
DEFAULT_HEAD = ("classifier",)

# head types: "cls" the architecture's own head (first token), "mean" MeanPoolingClassifier (mean of real tokens)
Pooling = Literal["cls", "mean"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
DEFAULT_POOLING: Pooling = "cls"
MEAN_HEAD = ("classifier",)  # what trains in a MeanPoolingClassifier besides the prefix


def check_pooling(pooling: object) -> str | None:
    """The problem with a head type name, or None."""
    return None if pooling in POOLINGS else f"pooling={pooling!r} (one of {list(POOLINGS)})"


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of each row's vectors over its real tokens: hidden (B, T, H), attention_mask (B, T) with 1 on
    real tokens (None: all real) -> (B, H). Padded positions, left or right, contribute nothing (not even a
    NaN); a row without real tokens gives zeros."""
    if attention_mask is None:
        return hidden.mean(1)
    real = attention_mask.bool()[..., None]  # (B, T, 1)
    total = torch.where(real, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(1)
    return total / real.sum(1).clamp(min=1).to(hidden.dtype)


@dataclass
class ClassifierOutput:
    """What a classifier returns: ``logits`` (B, num_labels), ``loss`` (scalar mean cross-entropy) with labels."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None


class MeanPoolingClassifier(nn.Module):
    """An encoder (a transformers base model, e.g. ``BertModel``) with a mean-pooling classification head:
    logits = classifier(dropout(masked_mean(last hidden states, attention_mask))).

    Under a P-tuning v2 prefix the prefix is keys/values only, so the last hidden states (and the mean) are
    those of the real tokens; padding is left out by the mask. ``classifier`` is the head that trains and is
    saved with the prefix (``MEAN_HEAD``); the encoder is the frozen base. Dropout: the config's
    ``classifier_dropout``, else its ``hidden_dropout_prob`` (BERT's rule), else none.
    """

    def __init__(self, encoder: nn.Module, num_labels: int) -> None:
        super().__init__()
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ConfigError(f"MeanPoolingClassifier: num_labels={num_labels!r} (an integer >= 2)")
        self.encoder = encoder
        self.config = encoder.config
        self.num_labels = num_labels
        cfg = encoder.config
        drop = getattr(cfg, "classifier_dropout", None)
        drop = getattr(cfg, "hidden_dropout_prob", 0.0) if drop is None else drop
        self.dropout = nn.Dropout(drop)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=getattr(cfg, "initializer_range", 0.02))  # as HF heads start
        nn.init.zeros_(self.classifier.bias)
        param = next(encoder.parameters())
        self.classifier.to(device=param.device, dtype=param.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder.get_input_embeddings()

    def pooled(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               **kwargs: Any) -> torch.Tensor:
        """(B, H): the masked mean of the encoder's last hidden states; input_ids / attention_mask (B, T)."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return masked_mean(out[0], attention_mask)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs: Any) -> ClassifierOutput:
        """Logits (B, num_labels) and, with ``labels`` (B,), the mean cross-entropy; other arguments (e.g.
        ``token_type_ids`` (B, T)) go to the encoder."""
        kwargs.pop("return_dict", None)
        logits = self.classifier(self.dropout(self.pooled(input_ids, attention_mask, **kwargs)))
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels.view(-1))
        return ClassifierOutput(logits=logits, loss=loss)


def head_modules(model: nn.Module, head: Sequence[str] | None = None) -> tuple[str, ...]:
    """Names of the task-head submodules of a classification model: ``head`` when given, else the
    ``MeanPoolingClassifier``'s classifier, else the ones a transformers architecture has (``HEADS``)."""
    if head is not None:
        return tuple(head)
    if isinstance(model, MeanPoolingClassifier):
        return MEAN_HEAD
    return HEADS.get(model.config.model_type, DEFAULT_HEAD)


def attach_classifier(model: nn.Module, config: PrefixConfig, head: Sequence[str] | None = None) -> PrefixModel:
    """Freeze ``model`` (a ...ForSequence/TokenClassification encoder or a ``MeanPoolingClassifier``), add a
    prefix, train its head (``head``: the submodules that train with the prefix; default: ``head_modules``)."""
    return attach(model, config, train_modules=head_modules(model, head))


def load_classifier_base(model_name: str, num_labels: int, pooling: Pooling = DEFAULT_POOLING
                         ) -> tuple[nn.Module, Any]:
    """A classification model with a new head of type ``pooling`` (sdpa attention) and its tokenizer: "cls" a
    transformers ...ForSequenceClassification, "mean" a ``MeanPoolingClassifier`` on its base model."""
    bad = check_pooling(pooling)
    if bad:
        raise ConfigError(f"load_classifier_base({model_name!r}): invalid {bad}")
    path = resolve_model(model_name)
    if pooling == "mean":
        model = MeanPoolingClassifier(AutoModel.from_pretrained(path, attn_implementation="sdpa"), num_labels)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(path)


@dataclass(frozen=True)
class ClassifySpec:
    """Which labelled data a classification run trains on.

    Attributes:
        data: sst2 | rte | boolq | path.jsonl/.csv/.tsv.
        split: the training split.
        dev_split: split for the dev metrics ('none' to skip).
        train_limit: first N training examples after a seeded shuffle ('none': all).
        text_field: text column of a file (None: 'text').
        text_pair_field: second text column of a file, if any.
        label_field: label column of a file (None: 'label').
        max_length: longest input in tokens (longer is truncated).
        pooling: the head type: cls (the architecture's head, on the first token) or mean (a linear
            classifier on the mean of the last hidden states over the real tokens).
    """

    data: str = "sst2"
    split: str = "train"
    dev_split: str | None = "dev"
    train_limit: int | None = None
    text_field: str | None = None
    text_pair_field: str | None = None
    label_field: str | None = None
    max_length: int = 128
    pooling: Pooling = DEFAULT_POOLING

    def __post_init__(self) -> None:
        bad = check_spec_fields(self)
        bad += [problem for problem in [check_pooling(self.pooling)] if problem]
        for name in ("text_field", "text_pair_field", "label_field"):
            if getattr(self, name) is not None and not (isinstance(getattr(self, name), str) and getattr(self, name)):
                bad.append(f"{name}={getattr(self, name)!r} (a non-empty string, or None)")
        if bad:
            raise ConfigError(f"{type(self).__name__}: invalid {'; '.join(bad)}")


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


class ClassificationTask:
    """P-tuning v2: a prefix and the task head of a frozen encoder; outputs are label names.

    ``labels`` (class names, index = class id) come from the training split when not given; the head type
    is ``spec.pooling``; ``head`` names the submodules that train with the prefix (default: the head's
    classifier, ``head_modules``).
    """

    kind: ClassVar[str] = "classify"
    unit: ClassVar[str] = "examples"

    def __init__(self, spec: ClassifySpec, labels: Sequence[str] | None = None,
                 head: Sequence[str] | None = None) -> None:
        self.spec = spec
        self._labels = tuple(labels) if labels is not None else None
        self.head = tuple(head) if head is not None else None

    @property
    def labels(self) -> tuple[str, ...] | None:
        return self._labels

    def read(self, split: str) -> list[ClassExample]:
        s = self.spec
        examples, labels = load_classification(s.data, split, text_field=s.text_field,
                                               text_pair_field=s.text_pair_field, label_field=s.label_field,
                                               labels=self._labels)
        self._labels = labels
        return examples

    def load_model(self, model_name: str) -> tuple[nn.Module, Any]:
        if self._labels is None:  # the head's size: the labels of the training split
            self.read(self.spec.split)
        return load_classifier_base(model_name, len(self._labels), self.spec.pooling)

    def attach(self, model: nn.Module, prefix: PrefixConfig, tokenizer: Any) -> PrefixModel:
        return attach_classifier(model, prefix, self.head)

    def encode(self, tokenizer: Any, records: Sequence[ClassExample], *, training: bool
               ) -> tuple[list[EncodedClass], int]:
        return encode_examples(tokenizer, records, self.spec.max_length), 0  # cutting at max_length is the policy

    def dev_records(self, records: list[ClassExample]) -> list[ClassExample]:
        return records

    def collate(self, batch: Sequence[EncodedClass], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_classes(batch, pad_id)

    def pad_id(self, tokenizer: Any) -> int:
        return tokenizer.pad_token_id or 0

    def fingerprint_rows(self, records: Sequence[ClassExample]) -> list[tuple[str, ...]]:
        return [(ex.text, ex.text_pair or "", str(ex.label)) for ex in records]

    def eval_set(self, split: str, limit: int | None) -> tuple[list[ClassExample], list[str]]:
        examples = self.read(split)
        examples = examples[:limit] if limit else examples
        return examples, [self._labels[ex.label] for ex in examples]

    def predict(self, model: nn.Module, tokenizer: Any, inputs: Sequence[ClassExample], decode: DecodeConfig,
                progress: bool = False) -> list[str]:
        ids = predict(model, encode_examples(tokenizer, inputs, self.spec.max_length), self.pad_id(tokenizer),
                      decode.batch_size)
        return [self._labels[i] for i in ids]

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | None]:
        index = {name: i for i, name in enumerate(self._labels)}
        return classification_metrics([index[p] for p in predictions], [index[r] for r in references])

    def decode_record(self, decode: DecodeConfig) -> dict[str, Any]:
        return {}
