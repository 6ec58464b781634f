"""Table-to-text records → token ids, with the source masked out of the loss.

Loading (`load_examples`) turns E2E, WebNLG 2017, DART, a local ``.jsonl``/``.csv`` file or a
Hugging Face dataset into `Example` records (source text, target text, ``"file:line"``).
Every bad row raises `DataError` naming the file, the physical 1-based line, the field and what
is wrong; no row is ever dropped silently.

Encoding (`encode_prompt`, `encode_example`, `encode_all`, `collate`) is for decoder-only
models and knows only token ids: a training sequence is ``prompt_ids + target_ids + [eos]``
with labels -100 on the prompt, and `collate` left-pads a batch.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import random
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from prefixtune.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "E2E_ATTRIBUTE_NAMES",
    "IGNORE_INDEX",
    "DataError",
    "EncodedExample",
    "Example",
    "Format",
    "collate",
    "encode_all",
    "encode_example",
    "encode_prompt",
    "group_references",
    "linearize_mr",
    "linearize_triples",
    "load_examples",
    "resolve_data_root",
    "shuffled_subset",
]

IGNORE_INDEX = -100
DATA_ENV = "PREFIXTUNE_DATA"
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


# --------------------------------------------------------------------------- reading text


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The data folder: ``data_root`` if given, else ``$PREFIXTUNE_DATA``, else ``<repo>/../shared/data``.

    ``<repo>`` is the checkout this module lives in (``src/prefixtune/tasks/data.py`` → four levels up).
    """
    if data_root is not None:
        return Path(data_root).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


@dataclass(frozen=True)
class _BadBytes:
    line: int
    offset: int
    raw: bytes


def _read_text(path: Path) -> tuple[str, _BadBytes | None]:
    """Decode ``path`` as UTF-8. Undecodable bytes become lone surrogates and are described by ``_BadBytes``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        bad = _BadBytes(data.count(b"\n", 0, exc.start) + 1, exc.start, data[exc.start : exc.end])
        return data.decode("utf-8", errors="surrogateescape"), bad


def _bad_bytes_error(path: Path, bad: _BadBytes, field_name: str | None) -> DataError:
    where = f"field {field_name!r}: " if field_name else ""
    return DataError(f"{path}:{bad.line}: {where}undecodable bytes {bad.raw!r} at byte offset {bad.offset}; "
                     "the file must be UTF-8")


_SURROGATE = re.compile("[\udc80-\udcff]")


def _physical_lines(text: str) -> list[str]:
    """Split on LF only (CRLF stays inside the line), keeping the line ends; lines are what we count."""
    lines = text.split("\n")
    out = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def _require_text(path: Path | str, line: int, name: str, value: Any, role: str) -> str:
    """``value`` stripped; DataError if it is not a string or is empty (``role``: "source"/"target")."""
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: field {name!r}: expected a string, got {type(value).__name__} {value!r}")
    value = value.strip()
    if not value:
        raise DataError(f"{path}:{line}: field {name!r}: empty {role}")
    return value


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
        target = _require_text(path, line, target_field, target, "target")
        if not source:
            raise DataError(f"{where}: source is empty")
        self.examples.append(Example(source, target, where, meta))

    def result(self) -> list[Example]:
        if self.skipped:
            shown = ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else "")
            warnings.warn(f"skipped {len(self.skipped)} row(s) with an empty target: {shown}", stacklevel=3)
        return self.examples


def _csv_rows(path: Path, fields: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (physical start line, {field: cell}) for each non-blank CSV row; header required."""
    text, bad = _read_text(path)
    lines = _physical_lines(text)
    reader = csv.reader(iter(lines), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise DataError(f"{path}:1: header: malformed CSV: {exc}") from None
    if header is None:
        raise DataError(f"{path}:1: empty file, expected a header naming {list(fields)}")
    header = [name.strip() for name in header]
    if bad is not None and any(_SURROGATE.search(name) for name in header):
        raise _bad_bytes_error(path, bad, "header")
    for name in fields:
        if name not in header:
            raise DataError(f"{path}:1: field {name!r}: missing from the header {header}")
    index = {name: header.index(name) for name in fields}
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader, None)
        except csv.Error as exc:
            raise DataError(f"{path}:{start}: malformed CSV: {exc}") from None
        if row is None:
            break
        if not row:
            continue
        if bad is not None:
            for name, cell in zip(header, row, strict=False):
                if _SURROGATE.search(cell):
                    raise _bad_bytes_error(path, bad, name)
        if len(row) != len(header):
            raise DataError(f"{path}:{start}: row has {len(row)} fields, the header has {len(header)} {header}")
        yield start, {name: row[i] for name, i in index.items()}
    if bad is not None:
        raise _bad_bytes_error(path, bad, None)


def _jsonl_rows(path: Path, fields: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line, object) for each non-blank JSON Lines row, checking that ``fields`` are present."""
    text, bad = _read_text(path)
    for line_no, line in enumerate(_physical_lines(text), start=1):
        if not line.strip():
            continue
        if bad is not None and line_no == bad.line:
            culprit = None
            try:
                obj = json.loads(line)
                if isinstance(obj, dict):
                    culprit = next((k for k, v in obj.items() if _SURROGATE.search(json.dumps(v, ensure_ascii=False))
                                    or _SURROGATE.search(k)), None)
            except json.JSONDecodeError:
                pass
            raise _bad_bytes_error(path, bad, culprit)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: malformed JSON at column {exc.colno}: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}")
        for name in fields:
            if name not in obj:
                raise DataError(f"{path}:{line_no}: field {name!r}: missing (keys present: {sorted(obj)})")
        yield line_no, obj


def _xml_entries(path: Path) -> Iterator[tuple[ET.Element, dict[int, int]]]:
    """Yield each ``<entry>`` element with {id(element): physical line of its start tag} for it and its children."""
    text, bad = _read_text(path)
    if bad is not None:
        raise _bad_bytes_error(path, bad, None)
    parser = ET.XMLPullParser(events=("start", "end"))
    starts: dict[int, int] = {}
    for line_no, line in enumerate(_physical_lines(text), start=1):
        try:
            parser.feed(line)
            events = list(parser.read_events())
        except ET.ParseError as exc:
            raise DataError(f"{path}:{exc.position[0]}: malformed XML: {exc}") from None
        for event, elem in events:
            if event == "start":
                starts[id(elem)] = line_no
            elif elem.tag == "entry":
                yield elem, starts
                elem.clear()
                starts = {}
    try:
        parser.close()
    except ET.ParseError as exc:
        raise DataError(f"{path}:{exc.position[0]}: malformed XML: {exc}") from None


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
    for line, row in _csv_rows(path, ("mr", "ref")):
        mr = _require_text(path, line, "mr", row["mr"], "source")
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
        for entry, starts in _xml_entries(path):
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
        for entry, _ in _xml_entries(path):
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
    reader = _jsonl_rows if path.suffix == ".jsonl" else _csv_rows
    for line, row in reader(path, (source_field, target_field)):
        source = _require_text(path, line, source_field, row[source_field], "source")
        rows.add(path, line, target_field, source, row[target_field], {})


def _load_hf(name: str, split: str, source_field: str, target_field: str, rows: _Rows) -> None:
    try:
        import datasets
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
        source = _require_text(where, row_no, source_field, row[source_field], "source")
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


def shuffled_subset(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """The first ``n`` examples after shuffling a copy with ``random.Random(seed)``.

    Stable across runs, and nested: the subset for ``n`` is a prefix of the one for ``n + k``.
    """
    if not 0 <= n <= len(examples):
        raise ValueError(f"n must be between 0 and {len(examples)} (the number of examples), got {n}")
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order[:n]


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Format:
    """How a source and a target become text.

    Prompt = tokens(``source``) + tokens(``separator``), each piece tokenized on its own
    (``add_special_tokens=False``), preceded by the tokenizer's BOS iff the tokenizer adds one
    by default. Target = tokens(``target_prefix + target``) + [EOS], tokenized on its own.
    Because the pieces are tokenized separately, the prompt ids at generation are exactly the
    ids the model saw before the target in training (no BPE merge across the boundary).
    Only BOS is taken from the tokenizer's default specials (an EOS or SEP it would append is
    not). To read a generation back: decode the ids after the prompt up to EOS and strip
    ``target_prefix``.
    """

    separator: str = "\n"
    target_prefix: str = " "

    def __post_init__(self) -> None:
        if not self.separator:
            raise ValueError("Format.separator must be non-empty: it marks where the target starts")


@dataclass(frozen=True)
class EncodedExample:
    """``input_ids`` and ``labels`` (same length; -100 on the prompt) of one example."""

    input_ids: list[int]
    labels: list[int]
    where: str = ""
    truncated: bool = False


@dataclass(frozen=True)
class _Specials:
    bos: list[int]  # [] or [bos_id]
    eos: int


def _specials(tokenizer: PreTrainedTokenizerBase) -> _Specials:
    """BOS iff ``tokenizer(text)`` starts with BOS where ``add_special_tokens=False`` does not."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token; set one so targets can end")
    bos_id = tokenizer.bos_token_id
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = bos_id is not None and with_specials[:1] == [bos_id] and plain[:1] != [bos_id]
    return _Specials([bos_id] if adds_bos else [], eos)


def _ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, source: str, fmt: Format) -> list[int]:
    """Token ids of the prompt: ``[BOS if default] + ids(source) + ids(separator)``."""
    specials = _specials(tokenizer)
    source_ids, sep_ids = _ids(tokenizer, [source, fmt.separator])
    return specials.bos + source_ids + sep_ids


OnTooLong = Literal["error", "truncate", "skip"]


def _assemble(bos: list[int], source_ids: list[int], sep_ids: list[int], target_ids: list[int],
              where: str, max_length: int | None, on_too_long: str) -> EncodedExample | None:
    fixed = len(bos) + len(sep_ids) + len(target_ids)
    total = fixed + len(source_ids)
    truncated = False
    if max_length is not None and total > max_length:
        lengths = (f"{total} tokens (prompt {total - len(target_ids)}, target {len(target_ids)} with EOS) "
                   f"> max_length {max_length}")
        if on_too_long == "skip":
            return None
        if on_too_long == "error":
            raise DataError(f"{where}: {lengths}; raise max_length or use on_too_long='truncate' or 'skip'")
        keep = max_length - fixed
        if keep < 1:
            raise DataError(f"{where}: {lengths}; the target alone does not fit after cutting the source, "
                            "so it cannot be truncated (the target is never cut); use 'skip'")
        source_ids, truncated = source_ids[:keep], True
    prompt = bos + source_ids + sep_ids
    return EncodedExample(prompt + target_ids, [IGNORE_INDEX] * len(prompt) + target_ids, where, truncated)


def _check_policy(on_too_long: str) -> None:
    if on_too_long not in ("error", "truncate", "skip"):
        raise ValueError(f"on_too_long must be 'error', 'truncate' or 'skip', got {on_too_long!r}")


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    fmt: Format,
    max_length: int | None,
    on_too_long: OnTooLong = "error",
) -> EncodedExample | None:
    """``input_ids = prompt + ids(target_prefix + target) + [eos]``; ``labels`` = -100 on the prompt.

    If longer than ``max_length``: "error" raises `DataError` naming ``example.where`` and the
    lengths; "truncate" keeps the first source tokens that fit (separator, target and EOS are
    never cut; raises if even the target does not fit); "skip" returns None.
    """
    _check_policy(on_too_long)
    specials = _specials(tokenizer)
    texts = [example.source, fmt.separator, fmt.target_prefix + example.target]
    source_ids, sep_ids, target_ids = _ids(tokenizer, texts)
    return _assemble(specials.bos, source_ids, sep_ids, [*target_ids, specials.eos], example.where,
                     max_length, on_too_long)


def encode_all(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    fmt: Format,
    max_length: int | None,
    on_too_long: OnTooLong = "error",
) -> tuple[list[EncodedExample], int]:
    """`encode_example` over ``examples`` (batched tokenization, same ids).

    Returns the encoded examples and how many were skipped ("skip") or truncated ("truncate"),
    so the caller can report them.
    """
    _check_policy(on_too_long)
    specials = _specials(tokenizer)
    (sep_ids,) = _ids(tokenizer, [fmt.separator])
    sources = _ids(tokenizer, [ex.source for ex in examples]) if examples else []
    targets = _ids(tokenizer, [fmt.target_prefix + ex.target for ex in examples]) if examples else []
    encoded: list[EncodedExample] = []
    affected = 0
    for ex, source_ids, target_ids in zip(examples, sources, targets, strict=True):
        item = _assemble(specials.bos, source_ids, sep_ids, [*target_ids, specials.eos], ex.where,
                         max_length, on_too_long)
        if item is None or item.truncated:
            affected += 1
        if item is not None:
            encoded.append(item)
    return encoded, affected


def pad_rows(rows: Sequence[Sequence[int]], value: int, side: Literal["left", "right"] = "left") -> torch.Tensor:
    """Lists of ints → a (B, T) int64 tensor padded with ``value`` on ``side``; T = the longest row."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            row = torch.tensor(list(r), dtype=torch.long)
            if side == "left":
                out[i, width - len(r) :] = row
            else:
                out[i, : len(r)] = row
    return out


def collate(
    batch: Sequence[EncodedExample], pad_id: int, padding_side: Literal["left", "right"] = "left"
) -> dict[str, torch.Tensor]:
    """Pad a batch (left by default): ``input_ids`` (B, T) padded with ``pad_id``, ``attention_mask`` (B, T)
    1/0, ``labels`` (B, T) -100 on padding; T = the longest example. All int64.

    With left padding, positions must come from the attention mask (``cumsum - 1``), not ``arange``
    (``PrefixModel`` does this; plain transformers models and PEFT want ``padding_side="right"`` in training).
    """
    if not batch:
        raise ValueError("collate: empty batch")
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        if n == 0 or len(item.labels) != n:
            raise ValueError(f"collate: {item.where or row}: {n} input ids and {len(item.labels)} labels")
    return {
        "input_ids": pad_rows([item.input_ids for item in batch], pad_id, padding_side),
        "attention_mask": pad_rows([[1] * len(item.input_ids) for item in batch], 0, padding_side),
        "labels": pad_rows([item.labels for item in batch], IGNORE_INDEX, padding_side),
    }
