"""Sentence(-pair) classification records: GLUE SST-2 and RTE, BoolQ, or a JSONL / CSV / TSV file, read through
the strict rows of ``rows`` (file, line and field in every error)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prefixtune.errors import DataError
from prefixtune.tasks.rows import require_text, resolve_data_root, table_rows


@dataclass(frozen=True)
class ClassExample:
    """One labelled text (or text pair); ``where`` is ``file:line``."""

    text: str
    text_pair: str | None
    label: int
    where: str


@dataclass(frozen=True)
class TaskSpec:
    """Where a named task's files are and how to read them."""

    files: dict[str, str]  # split -> path under the data root
    text: str
    text_pair: str | None
    label: str
    labels: tuple[str, ...]  # label names, index = class id


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec({"train": "glue/SST-2/train.tsv", "dev": "glue/SST-2/dev.tsv"}, "sentence", None, "label",
                     ("0", "1")),
    "rte": TaskSpec({"train": "glue/RTE/train.tsv", "dev": "glue/RTE/dev.tsv"}, "sentence1", "sentence2", "label",
                    ("not_entailment", "entailment")),
    "boolq": TaskSpec({"dev": "glue/BoolQ/val.jsonl"}, "question", "passage", "label", ("False", "True")),
}


def _label_id(value: object, labels: Sequence[str], where: str, field: str) -> int:
    text = str(value).strip()
    if text in labels:
        return labels.index(text)
    raise DataError(f"{where}: field {field!r}: {value!r} is not one of the labels {list(labels)}")


def load_classification(
    data: str,
    split: str,
    *,
    text_field: str | None = None,
    text_pair_field: str | None = None,
    label_field: str | None = None,
    labels: Sequence[str] | None = None,
    data_root: str | Path | None = None,
) -> tuple[list[ClassExample], tuple[str, ...]]:
    """Examples of ``data`` (sst2 | rte | boolq | a file path) and the label names.

    For a file, ``text_field`` (default ``text``), ``text_pair_field`` (none), ``label_field``
    (default ``label``) name the columns; label names are the sorted distinct values unless
    ``labels`` is given. Missing fields and unknown labels raise DataError with file:line.
    """
    if data in TASKS:
        task = TASKS[data]
        if split not in task.files:
            raise DataError(f"{data} has no '{split}' split here (available: {sorted(task.files)})")
        path = resolve_data_root(data_root) / task.files[split]
        text_field, text_pair_field, label_field = task.text, task.text_pair, task.label
        labels = task.labels
    else:
        path = Path(data)
        text_field = text_field or "text"
        label_field = label_field or "label"
    fields = [f for f in (text_field, text_pair_field, label_field) if f is not None]
    rows = list(table_rows(path, fields))  # the strict reader: file, line and field in every error
    if labels is None:
        labels = tuple(sorted({str(r[label_field]).strip() for _, r in rows}))
    out = []
    for line, row in rows:
        text = require_text(path, line, text_field, row[text_field], "text")
        pair = require_text(path, line, text_pair_field, row[text_pair_field], "text pair") if text_pair_field else None
        label = _label_id(row[label_field], labels, f"{path}:{line}", label_field)
        out.append(ClassExample(text, pair, label, f"{path}:{line}"))
    if not out:
        raise DataError(f"{path}: no examples")
    return out, tuple(labels)
