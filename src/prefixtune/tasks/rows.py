"""Strict reading of data files: every bad row raises `DataError` naming the file, the 1-based physical line,
the field and what is wrong; no row is ever dropped silently.

Files are read as strict UTF-8 (a leading BOM is allowed); undecodable bytes are reported at their line and
field. One contract for every reader of ours: table-to-text files (``readers``) and classification files
(``glue``) alike.
"""

from __future__ import annotations

import csv
import json
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefixtune.errors import DataError

DATA_ENV = "PREFIXTUNE_DATA"


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The data folder: ``data_root`` if given, else ``$PREFIXTUNE_DATA``, else ``<repo>/../shared/data``.

    ``<repo>`` is the checkout this module lives in (``src/prefixtune/tasks/rows.py`` → four levels up).
    """
    if data_root is not None:
        return Path(data_root).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


@dataclass(frozen=True)
class BadBytes:
    line: int
    offset: int
    raw: bytes


def read_text(path: Path) -> tuple[str, BadBytes | None]:
    """Decode ``path`` as UTF-8. Undecodable bytes become lone surrogates and are described by ``BadBytes``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        bad = BadBytes(data.count(b"\n", 0, exc.start) + 1, exc.start, data[exc.start : exc.end])
        return data.decode("utf-8", errors="surrogateescape"), bad


def bad_bytes_error(path: Path, bad: BadBytes, field_name: str | None) -> DataError:
    where = f"field {field_name!r}: " if field_name else ""
    return DataError(f"{path}:{bad.line}: {where}undecodable bytes {bad.raw!r} at byte offset {bad.offset}; "
                     "the file must be UTF-8")


SURROGATE = re.compile("[\udc80-\udcff]")


def physical_lines(text: str) -> list[str]:
    """Split on LF only (CRLF stays inside the line), keeping the line ends; lines are what we count."""
    lines = text.split("\n")
    out = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
        out.append(lines[-1])
    return out


def require_text(path: Path | str, line: int, name: str, value: Any, role: str) -> str:
    """``value`` stripped; DataError if it is not a string or is empty (``role``: "source"/"target")."""
    if not isinstance(value, str):
        raise DataError(f"{path}:{line}: field {name!r}: expected a string, got {type(value).__name__} {value!r}")
    value = value.strip()
    if not value:
        raise DataError(f"{path}:{line}: field {name!r}: empty {role}")
    return value


def csv_rows(path: Path, fields: Sequence[str], *, tsv: bool = False) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (physical start line, {field: cell}) for each non-blank CSV row; header required, naming ``fields``.

    ``tsv``: tab-separated with quoting off (as GLUE's files need: their sentences hold bare quotes).
    """
    text, bad = read_text(path)
    lines = physical_lines(text)
    dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    reader = csv.reader(iter(lines), strict=True, **dialect)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise DataError(f"{path}:1: header: malformed CSV: {exc}") from None
    if header is None:
        raise DataError(f"{path}:1: empty file, expected a header naming {list(fields)}")
    header = [name.strip() for name in header]
    if bad is not None and any(SURROGATE.search(name) for name in header):
        raise bad_bytes_error(path, bad, "header")
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
                if SURROGATE.search(cell):
                    raise bad_bytes_error(path, bad, name)
        if len(row) != len(header):
            raise DataError(f"{path}:{start}: row has {len(row)} fields, the header has {len(header)} {header}")
        yield start, {name: row[i] for name, i in index.items()}
    if bad is not None:
        raise bad_bytes_error(path, bad, None)


def jsonl_rows(path: Path, fields: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line, object) for each non-blank JSON Lines row, checking that ``fields`` are present."""
    text, bad = read_text(path)
    for line_no, line in enumerate(physical_lines(text), start=1):
        if not line.strip():
            continue
        if bad is not None and line_no == bad.line:
            culprit = None
            try:
                obj = json.loads(line)
                if isinstance(obj, dict):
                    culprit = next((k for k, v in obj.items() if SURROGATE.search(json.dumps(v, ensure_ascii=False))
                                    or SURROGATE.search(k)), None)
            except json.JSONDecodeError:
                pass
            raise bad_bytes_error(path, bad, culprit)
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


def xml_entries(path: Path) -> Iterator[tuple[ET.Element, dict[int, int]]]:
    """Yield each ``<entry>`` element with {id(element): physical line of its start tag} for it and its children."""
    text, bad = read_text(path)
    if bad is not None:
        raise bad_bytes_error(path, bad, None)
    parser = ET.XMLPullParser(events=("start", "end"))
    starts: dict[int, int] = {}
    for line_no, line in enumerate(physical_lines(text), start=1):
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


def table_rows(path: Path, fields: Sequence[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """`jsonl_rows`, `csv_rows` or (tab-separated) `csv_rows` of ``path``, by its suffix."""
    if path.suffix == ".jsonl":
        return jsonl_rows(path, fields)
    if path.suffix in (".csv", ".tsv"):
        return csv_rows(path, fields, tsv=path.suffix == ".tsv")
    raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .csv or .tsv)")
