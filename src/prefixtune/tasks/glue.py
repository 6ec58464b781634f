"""Sentence(-pair) classification records: GLUE SST-2 and RTE, BoolQ, or a JSONL / CSV / TSV file."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prefixtune.tasks.data import DataError, resolve_data_root


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
    text = str(value)
    if text in labels:
        return labels.index(text)
    raise DataError(f"{where}: field '{field}' is {value!r}; expected one of {list(labels)}")


def _read_rows(path: Path) -> list[tuple[int, dict[str, object]]]:
    """(line, row) pairs of a .jsonl, .csv or .tsv file (TSV read with quoting off, as GLUE needs)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{i}: expected a JSON object")
            rows.append((i, obj))
        return rows
    if path.suffix not in (".csv", ".tsv"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .csv or .tsv)")
    quoting = csv.QUOTE_NONE if path.suffix == ".tsv" else csv.QUOTE_MINIMAL
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix == ".tsv" else ",", quoting=quoting)
    return [(reader.line_num, dict(row)) for row in reader]


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
    rows = _read_rows(path)
    if labels is None:
        labels = tuple(sorted({str(r.get(label_field)) for _, r in rows if r.get(label_field) is not None}))
    out = []
    for line, row in rows:
        where = f"{path}:{line}"
        for field in (text_field, text_pair_field, label_field):
            if field is not None and (row.get(field) is None or str(row.get(field)).strip() == ""):
                raise DataError(f"{where}: field '{field}' is missing or empty")
        pair = str(row[text_pair_field]).strip() if text_pair_field else None
        label = _label_id(row[label_field], labels, where, label_field)
        out.append(ClassExample(str(row[text_field]).strip(), pair, label, where))
    if not out:
        raise DataError(f"{path}: no examples")
    return out, tuple(labels)
