"""Table-to-text generation as a `Task`: records from ``readers``, token ids from ``encoding``, outputs from
``decode``, the E2E, WebNLG 2017 / DART or sacrebleu metrics (METEOR where Java runs) from ``metrics``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import PrefixModel, attach
from prefixtune.errors import ConfigError
from prefixtune.io.hub import load_causal_lm
from prefixtune.tasks.decode import generate_texts
from prefixtune.tasks.encoding import EncodedExample, Format, collate, encode_all
from prefixtune.tasks.metrics import WEBNLG_DATA, e2e_metrics, generation_metrics, webnlg_metrics, with_optional_meteor
from prefixtune.tasks.readers import Example, group_references, load_examples, shuffled_subset
from prefixtune.tasks.task import DecodeConfig

E2E_LIKE = ("e2e",)  # data sets scored with the E2E challenge's five metrics
# webnlg / dart (WEBNLG_DATA): the WebNLG 2017 challenge's BLEU / METEOR / TER; other data: sacrebleu's
ON_TOO_LONG = ("error", "truncate", "skip")


@dataclass(frozen=True)
class DataSpec:
    """Which data a generation run trains on and how text becomes tokens.

    Attributes:
        data: e2e | webnlg | dart | path.jsonl | path.csv | hf:NAME.
        split: the training split.
        dev_split: split for the dev loss ('none' to skip).
        dev_limit: dev examples for the dev loss (a seeded subset; 'none': all).
        train_limit: first N training examples after a seeded shuffle ('none': all).
        source_field: source column/key of a .jsonl/.csv/hf: dataset (None: 'source').
        target_field: target column/key of a .jsonl/.csv/hf: dataset (None: 'target').
        max_length: longest training sequence in tokens.
        on_too_long: what to do with a longer example (truncate cuts the source; both are reported).
        separator: text between source and target.
        target_prefix: text in front of every target (its tokens are trained).
    """

    data: str = "e2e"
    split: str = "train"
    dev_split: str | None = "dev"
    dev_limit: int | None = 200
    train_limit: int | None = None
    source_field: str | None = None
    target_field: str | None = None
    max_length: int = 256
    on_too_long: Literal["error", "truncate", "skip"] = "error"
    separator: str = "\n"
    target_prefix: str = " "

    def __post_init__(self) -> None:
        bad = check_spec_fields(self)
        if self.dev_limit is not None and not _is_int(self.dev_limit, 1):
            bad.append(f"dev_limit={self.dev_limit!r} (an integer >= 1, or None)")
        if self.on_too_long not in ON_TOO_LONG:
            bad.append(f"on_too_long={self.on_too_long!r} (one of {list(ON_TOO_LONG)})")
        for name in ("source_field", "target_field"):
            if getattr(self, name) is not None and not (isinstance(getattr(self, name), str) and getattr(self, name)):
                bad.append(f"{name}={getattr(self, name)!r} (a non-empty string, or None)")
        if not isinstance(self.separator, str) or not self.separator:
            bad.append(f"separator={self.separator!r} (non-empty: it marks where the target starts)")
        if not isinstance(self.target_prefix, str):
            bad.append(f"target_prefix={self.target_prefix!r} (a string)")
        if bad:
            raise ConfigError(f"{type(self).__name__}: invalid {'; '.join(bad)}")

    @property
    def format(self) -> Format:
        return Format(separator=self.separator, target_prefix=self.target_prefix)


def _is_int(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_spec_fields(spec: Any) -> list[str]:
    """Problems with the fields every data spec has (data, split, dev_split, train_limit, max_length)."""
    bad = []
    for name in ("data", "split"):
        if not isinstance(getattr(spec, name), str) or not getattr(spec, name):
            bad.append(f"{name}={getattr(spec, name)!r} (a non-empty string)")
    if spec.dev_split is not None and (not isinstance(spec.dev_split, str) or not spec.dev_split):
        bad.append(f"dev_split={spec.dev_split!r} (a split name, or None)")
    if spec.train_limit is not None and not _is_int(spec.train_limit, 0):
        bad.append(f"train_limit={spec.train_limit!r} (an integer >= 0, or None)")
    if not _is_int(spec.max_length, 1):
        bad.append(f"max_length={spec.max_length!r} (an integer >= 1)")
    return bad


class GenerationTask:
    """Table-to-text with a causal LM: sources → targets, left-padded batches, loss on target tokens only."""

    kind: ClassVar[str] = "generate"
    unit: ClassVar[str] = "sources"

    def __init__(self, spec: DataSpec) -> None:
        self.spec = spec

    @property
    def labels(self) -> None:
        return None

    def read(self, split: str, on_empty_target: Literal["error", "skip"] = "error") -> list[Example]:
        s = self.spec
        return load_examples(s.data, split, source_field=s.source_field, target_field=s.target_field,
                             on_empty_target=on_empty_target)

    def load_model(self, model_name: str) -> tuple[nn.Module, Any]:
        return load_causal_lm(model_name)

    def attach(self, model: nn.Module, prefix: PrefixConfig, tokenizer: Any) -> PrefixModel:
        return attach(model, prefix, tokenizer)

    def encode(self, tokenizer: Any, records: Sequence[Example], *, training: bool
               ) -> tuple[list[EncodedExample], int]:
        policy = self.spec.on_too_long if training else "truncate"
        return encode_all(tokenizer, records, self.spec.format, self.spec.max_length, policy)

    def dev_records(self, records: list[Example]) -> list[Example]:
        """The dev examples the dev loss uses: a subset of ``dev_limit``, seeded alike in every run."""
        if self.spec.dev_limit is None:
            return records
        return shuffled_subset(records, min(self.spec.dev_limit, len(records)), 0)

    def collate(self, batch: Sequence[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(batch, pad_id)

    def pad_id(self, tokenizer: Any) -> int:
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def fingerprint_rows(self, records: Sequence[Example]) -> list[tuple[str, ...]]:
        return [(ex.source, ex.target) for ex in records]

    def eval_set(self, split: str, limit: int | None) -> tuple[list[str], list[list[str]]]:
        """Unique sources in first-appearance order and the targets of each (its references; an empty
        reference is dropped with a warning naming its line)."""
        sources, refs = group_references(self.read(split, on_empty_target="skip"))  # DART test has an empty <lex/>
        return (sources[:limit], refs[:limit]) if limit is not None else (sources, refs)

    def predict(self, model: nn.Module, tokenizer: Any, inputs: Sequence[str], decode: DecodeConfig,
                progress: bool = False) -> list[str]:
        return generate_texts(model, tokenizer, inputs, self.spec.format, batch_size=decode.batch_size,
                              num_beams=decode.beams, max_new_tokens=decode.max_new_tokens, progress=progress)

    def score(self, predictions: Sequence[str], references: Sequence[list[str]]) -> dict[str, float | None]:
        """E2E: BLEU, NIST, METEOR, ROUGE-L, CIDEr (official-script style); WebNLG / DART: BLEU (0-100),
        METEOR and TER (0-1) as the WebNLG 2017 challenge's scripts compute them; others: sacrebleu BLEU,
        TER (0-100) and METEOR.

        Where METEOR cannot run (no Java), all leave it out the same way: ``"METEOR": null`` and a note.
        """
        preds, refs = list(predictions), [list(r) for r in references]
        if self.spec.data in E2E_LIKE:
            return with_optional_meteor(
                lambda scorer: e2e_metrics(preds, refs, include_meteor=scorer is not None, meteor_scorer=scorer))
        if self.spec.data in WEBNLG_DATA:
            return with_optional_meteor(lambda scorer: webnlg_metrics(
                preds, refs, data=self.spec.data, include_meteor=scorer is not None, meteor_scorer=scorer))
        return with_optional_meteor(
            lambda scorer: generation_metrics(preds, refs, include_meteor=scorer is not None, meteor_scorer=scorer))

    def decode_record(self, decode: DecodeConfig) -> dict[str, Any]:
        return {"num_beams": decode.beams}
