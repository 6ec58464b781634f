"""Table-to-text records: E2E, WebNLG 2017, DART, a local ``.jsonl``/``.csv`` file or a Hugging Face dataset
→ `Example` records (source text, target text, ``"file:line"``), read through the strict rows of ``rows``.
"""

from __future__ import annotations

import functools
import os
import random
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from prefixtune.errors import DataError
from prefixtune.tasks.rows import DATA_ENV, csv_rows, jsonl_rows, require_text, resolve_data_root, xml_entries

T = TypeVar("T")

# E2E attribute names as Li & Liang's preprocessed files write them (e2e/prefixtuning_format/).
E2E_ATTRIBUTE_NAMES: Mapping[str, str] = {"eatType": "Type", "familyFriendly": "family friendly", "priceRange": "price"}
E2E_SPLITS = ("train", "dev", "test")
WEBNLG_SPLITS = ("train", "dev", "test")
DART_SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class Example:
    """One (source, target) pair. ``where`` is ``"file:line"`` (1-based physical line of the row)."""

    source: str
    target: str
    where: str
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)


class _Rows:
    """Collects examples; applies the empty-target policy (error, or skip with one warning)."""

    def __init__(self, on_empty_target: str) -> None:
        if on_empty_target not in ("error", "skip"):
            raise ValueError(f"on_empty_target must be 'error' or 'skip', got {on_empty_target!r}")
        self.on_empty_target = on_empty_target
        self.examples: list[Example] = []
        self.skipped: list[str] = []

    def add(self, path: Path | str, line: int, target_field: str, source: str, target: Any,
            meta: Mapping[str, str]) -> None:
        where = f"{path}:{line}"
        if isinstance(target, str) and not target.strip():
            if self.on_empty_target == "error":
                raise DataError(f"{where}: field {target_field!r}: empty target "
                                "(on_empty_target='skip' drops such rows with a warning)")
            self.skipped.append(where)
            return
        target = require_text(path, line, target_field, target, "target")
        if not source:
            raise DataError(f"{where}: source is empty")
        self.examples.append(Example(source, target, where, meta))

    def result(self) -> list[Example]:
        if self.skipped:
            shown = ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            warnings.warn(f"skipped {len(self.skipped)} row(s) with an empty target: {shown}", stacklevel=3)
        return self.examples


# --------------------------------------------------------------------------- linearization

_MR_ITEM = re.compile(r"\s*([^\[\],]+?)\s*\[([^\[\]]*)\]\s*(,|$)")


def linearize_mr(mr: str, names: Mapping[str, str] = E2E_ATTRIBUTE_NAMES) -> str:
    """E2E MR ``name[X], eatType[Y]`` → ``name : X | Type : Y`` (attribute order kept).

    Parsed by the ``attr[value]`` structure, so commas inside values are kept. ``names`` renames
    attributes; the default gives Li & Liang's names (``Type``, ``family friendly``, ``price``);
    pass ``{}`` to keep the dataset's names. Values are kept verbatim (Li & Liang's files also
    space-tokenize them, e.g. ``£ 20 - 25``; this function does not). Raises ValueError if malformed.
    """
    items: list[str] = []
    pos = 0
    while pos < len(mr):
        match = _MR_ITEM.match(mr, pos)
        if match is None or not match.group(2).strip() or (match.group(3) == "," and match.end() == len(mr)):
            raise ValueError(f"malformed MR at character {pos}: expected 'attribute[value], ...', got {mr!r}")
        attr, value = match.group(1), match.group(2).strip()
        items.append(f"{names.get(attr, attr)} : {value}")
        pos = match.end()
    if not items:
        raise ValueError(f"malformed MR: no 'attribute[value]' items in {mr!r}")
    return " | ".join(items)


def linearize_triples(triples: Sequence[tuple[str, str, str]], *, underscores_to_spaces: bool = True) -> str:
    """Triples → ``subject : property : object | ...`` (order kept).

    With ``underscores_to_spaces`` (the default used by `load_examples`), ``_`` in subjects and
    objects becomes a space (``Aarhus_Airport`` → ``Aarhus Airport``); properties are kept as they
    are (``elevationAboveTheSeaLevel_(in_metres)``). Li & Liang's released code keeps the
    underscores and starts WebNLG sources with ``" | "``; we do neither.
    """
    def entity(text: str) -> str:
        return text.replace("_", " ") if underscores_to_spaces else text

    return " | ".join(f"{entity(s)} : {p} : {entity(o)}" for s, p, o in triples)


# --------------------------------------------------------------------------- datasets


def _load_e2e(root: Path, split: str, rows: _Rows) -> None:
    if split not in E2E_SPLITS:
        raise DataError(f"e2e: unknown split {split!r}, expected one of {list(E2E_SPLITS)}")
    path = root / "e2e" / f"{split}.csv"
    for line, row in csv_rows(path, ("mr", "ref")):
        mr = require_text(path, line, "mr", row["mr"], "source")
        try:
            source = linearize_mr(mr)
        except ValueError as exc:
            raise DataError(f"{path}:{line}: field 'mr': {exc}") from None
        rows.add(path, line, "ref", source, row["ref"], {"mr": mr})


def _entry_triples(path: Path, entry: ET.Element, starts: dict[int, int]) -> list[tuple[str, str, str]]:
    line = starts.get(id(entry), 0)
    sets = entry.findall("modifiedtripleset")
    if len(sets) != 1:
        raise DataError(f"{path}:{line}: field 'modifiedtripleset': expected one per entry, found {len(sets)}")
    triples = []
    for mtriple in sets[0].findall("mtriple"):
        parts = [part.strip() for part in (mtriple.text or "").split(" | ")]
        if len(parts) != 3 or not all(parts):
            raise DataError(f"{path}:{starts.get(id(mtriple), line)}: field 'mtriple': expected "
                            f"'subject | property | object', got {mtriple.text!r}")
        triples.append((parts[0], parts[1], parts[2]))
    if not triples:
        raise DataError(f"{path}:{line}: field 'mtriple': entry has no triples (empty source)")
    return triples


def _load_triple_files(paths: Sequence[Path], rows: _Rows, seen: frozenset[str] | None = None) -> None:
    """One example per ``<lex>`` of each ``<entry>``; meta: category, eid, size, lid, comment (+ seen)."""
    for path in paths:
        for entry, starts in xml_entries(path):
            source = linearize_triples(_entry_triples(path, entry, starts))
            lexes = entry.findall("lex")
            if not lexes:
                raise DataError(f"{path}:{starts.get(id(entry), 0)}: field 'lex': entry has no reference")
            base = {"category": entry.get("category", ""), "eid": entry.get("eid", ""), "size": entry.get("size", "")}
            if seen is not None:
                base["seen"] = "seen" if base["category"] in seen else "unseen"
            for lex in lexes:
                meta = {**base, "lid": lex.get("lid", ""), "comment": lex.get("comment", "")}
                rows.add(path, starts[id(lex)], "lex", source, "".join(lex.itertext()), meta)


def _webnlg_files(root: Path, split: str) -> list[Path]:
    folder = root / "webnlg_challenge_2017"
    if split == "test":
        paths = [folder / "test" / "testdata_with_lex.xml"]
    else:
        paths = sorted((folder / split).glob("*triples/*.xml"))
    if not paths or not paths[0].is_file():
        raise DataError(f"webnlg {split}: no XML files at {folder / split}; set {DATA_ENV} or data_root")
    return paths


@functools.lru_cache(maxsize=4)
def _webnlg_train_categories(root: Path) -> frozenset[str]:
    categories = set()
    for path in _webnlg_files(root, "train"):
        for entry, _ in xml_entries(path):
            categories.add(entry.get("category", ""))
    return frozenset(categories)


def _load_webnlg(root: Path, split: str, rows: _Rows) -> None:
    if split not in WEBNLG_SPLITS:
        raise DataError(f"webnlg: unknown split {split!r}, expected one of {list(WEBNLG_SPLITS)}")
    seen = _webnlg_train_categories(root) if split == "test" else None
    _load_triple_files(_webnlg_files(root, split), rows, seen)


def _load_dart(root: Path, split: str, rows: _Rows) -> None:
    if split not in DART_SPLITS:
        raise DataError(f"dart: unknown split {split!r}, expected one of {list(DART_SPLITS)}")
    path = root / "dart" / f"dart-v1.1.1-full-{split}.xml"
    if not path.is_file():
        hint = " The shared data has only DART dev and test (the train split was too large to obtain);" \
               " put the train XML there or pass a path." if split == "train" else ""
        raise DataError(f"dart {split}: {path} is not available.{hint}")
    _load_triple_files([path], rows)


def _load_file(path: Path, source_field: str, target_field: str, rows: _Rows) -> None:
    reader = jsonl_rows if path.suffix == ".jsonl" else csv_rows
    for line, row in reader(path, (source_field, target_field)):
        source = require_text(path, line, source_field, row[source_field], "source")
        rows.add(path, line, target_field, source, row[target_field], {})


def _load_hf(name: str, split: str, source_field: str, target_field: str, rows: _Rows) -> None:
    try:
        import datasets  # optional (in no extra): only hf: data needs it, and its absence is a DataError
    except ImportError:
        raise DataError(f"hf:{name}: the 'datasets' package is not installed (pip install datasets)") from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, missing dataset, bad split: all reported the same way
        raise DataError(f"hf:{name}: could not load split {split!r} (is the Hugging Face Hub reachable, "
                        f"and does the dataset exist?): {type(exc).__name__}: {exc}") from exc
    where = f"hf:{name}/{split}"
    for row_no, row in enumerate(dataset, start=1):
        for name_ in (source_field, target_field):
            if name_ not in row:
                raise DataError(f"{where}:{row_no}: field {name_!r}: missing (columns: {sorted(row)})")
        source = require_text(where, row_no, source_field, row[source_field], "source")
        rows.add(where, row_no, target_field, source, row[target_field], {})


def load_examples(
    data: str | os.PathLike[str],
    split: str,
    *,
    source_field: str | None = None,
    target_field: str | None = None,
    data_root: str | Path | None = None,
    on_empty_target: Literal["error", "skip"] = "error",
) -> list[Example]:
    """Load ``data`` (``e2e``, ``webnlg``, ``dart``, ``hf:NAME`` or a ``.jsonl``/``.csv`` path) as examples.

    * ``e2e`` (train|dev|test): one example per (MR, ref) CSV row; source = `linearize_mr`;
      meta ``mr`` (the raw MR).
    * ``webnlg`` (train|dev from ``*triples/*.xml``, test from ``testdata_with_lex.xml``) and
      ``dart`` (dev|test; train only if its XML is present): one example per ``<lex>``, every
      ``comment`` kept (WebNLG has some ``toFix`` ones); source = `linearize_triples` of the
      modified triples, underscores in entities turned into spaces. Meta: ``category``, ``eid``,
      ``size``, ``lid``, ``comment``, and for WebNLG test ``seen`` = ``"seen"``/``"unseen"``
      (seen = category occurs in WebNLG train).
    * a path ending in ``.jsonl`` or ``.csv``: fields ``source_field``/``target_field``
      (default ``source``/``target``); ``split`` is ignored. Blank lines are not rows.
    * ``hf:NAME``: ``datasets.load_dataset(NAME, split=split)``; ``where`` is ``hf:NAME/split:ROW``
      (ROW 1-based).

    Sources and targets are stripped of surrounding whitespace, nothing else. Files are read as
    strict UTF-8 (a leading BOM is allowed). Any bad row raises `DataError`; an empty target
    raises too unless ``on_empty_target="skip"``, which drops it with a warning naming its line.
    """
    data = os.fspath(data)
    root = resolve_data_root(data_root)
    rows = _Rows(on_empty_target)
    named = {"e2e": _load_e2e, "webnlg": _load_webnlg, "dart": _load_dart}
    if data in named:
        if source_field is not None or target_field is not None:
            raise DataError(f"{data}: source_field/target_field apply only to files and hf: datasets")
        named[data](root, split, rows)
    elif data.startswith("hf:"):
        _load_hf(data[3:], split, source_field or "source", target_field or "target", rows)
    elif data.endswith((".jsonl", ".csv")):
        _load_file(Path(data), source_field or "source", target_field or "target", rows)
    else:
        raise DataError(f"unknown data {data!r}: expected 'e2e', 'webnlg', 'dart', 'hf:NAME', or a .jsonl/.csv path")
    return rows.result()


def group_references(examples: Sequence[Example]) -> tuple[list[str], list[list[str]]]:
    """Unique sources in first-appearance order, and the targets of each (its references).

    Entries with the same source are merged: E2E dev 547 groups (= consecutive MR rows), but
    WebNLG dev 871 groups for 872 entries and DART test 4,159 for 5,097 entries.
    """
    groups: dict[str, list[str]] = {}
    for example in examples:
        groups.setdefault(example.source, []).append(example.target)
    return list(groups), list(groups.values())


def shuffled_subset(examples: Sequence[T], n: int, seed: int) -> list[T]:
    """The first ``n`` examples after shuffling a copy with ``random.Random(seed)``.

    Stable across runs, and nested: the subset for ``n`` is a prefix of the one for ``n + k``.
    """
    if not 0 <= n <= len(examples):
        raise ValueError(f"n must be between 0 and {len(examples)} (the number of examples), got {n}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order[:n]
