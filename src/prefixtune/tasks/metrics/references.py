"""Predictions and reference groups: reading them from files, checking that they line up."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

_SOURCE_COLUMNS = ("mr", "src", "source", "meaning_representation", "input")
_REFERENCE_COLUMNS = ("ref", "reference", "references", "target", "tgt", "text")
# Broken encodings of "£" and "é" seen in early E2E releases; the official script repairs them.
_MOJIBAKE = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def _fix_mojibake(text: str) -> str:
    for bad, good in _MOJIBAKE:
        text = text.replace(bad, good)
    return text


def read_predictions(path: str | Path) -> list[str]:
    """Read one prediction per line (whitespace stripped; empty lines are empty predictions)."""
    with open(path, encoding="utf-8-sig") as fh:
        return [line.strip() for line in fh]


def read_reference_groups_txt(path: str | Path) -> list[list[str]]:
    """Read references grouped by blank lines (one reference per line).

    A file without any blank line is read as single-reference data (one group per line),
    as the official E2E script does. Several blank lines in a row count as one separator
    (the official script would make empty groups of them).
    """
    groups: list[list[str]] = [[]]
    with open(path, encoding="utf-8-sig") as fh:
        for raw in fh:
            line = raw.strip()
            if line:
                groups[-1].append(line)
            elif groups[-1]:
                groups.append([])
    if not groups[-1]:
        groups.pop()
    if len(groups) == 1:
        return [[line] for line in groups[0]]
    return groups


def _find_column(header: Sequence[str], names: Sequence[str], path: str | Path) -> int:
    lowered = [name.strip().lower() for name in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise ValueError(f"{path}: no column named one of {list(names)} in header {list(header)}")


def read_reference_groups_csv(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Read an E2E-style CSV (``mr``, ``ref`` columns with header).

    Consecutive rows with the same source form one reference group. Returns the group sources
    in file order (a source repeated later, not consecutively, starts a new group) and the
    reference groups. Line breaks inside a reference become spaces.
    """
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{path}: empty CSV file")
    src_col = _find_column(rows[0], _SOURCE_COLUMNS, path)
    ref_col = _find_column(rows[0], _REFERENCE_COLUMNS, path)
    sources: list[str] = []
    groups: list[list[str]] = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(src_col, ref_col):
            raise ValueError(f"{path}: row {line_no} has {len(row)} columns, expected {len(rows[0])}")
        source = row[src_col]
        reference = " ".join(_fix_mojibake(row[ref_col]).split())
        if not sources or source != sources[-1]:
            sources.append(source)
            groups.append([])
        groups[-1].append(reference)
    return sources, groups


def check_lengths(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    predictions_file: str | Path | None = None,
    references_file: str | Path | None = None,
) -> None:
    if isinstance(predictions, str):
        raise TypeError("predictions must be a list of strings, not a single string")
    if len(predictions) != len(references):
        where = ""
        if predictions_file is not None or references_file is not None:
            where = f" (predictions file {predictions_file}, references file {references_file})"
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference groups{where}")
    for index, group in enumerate(references):
        if isinstance(group, str):
            raise TypeError(f"reference group {index} is a string; expected a list of strings")
        if not any(ref.strip() for ref in group):
            raise ValueError(f"reference group {index} has no non-empty reference")


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Transpose per-prediction groups into sacrebleu streams, padding with None."""
    width = max((len(group) for group in references), default=0)
    return [[group[k] if k < len(group) else None for group in references] for k in range(width)]
