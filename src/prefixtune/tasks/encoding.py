"""Table-to-text records → token ids for decoder-only models, with the source masked out of the loss.

A training sequence is ``prompt_ids + target_ids + [eos]`` with labels -100 on the prompt; `collate`
left-pads a batch. Knows only token ids and `Example` records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from prefixtune.errors import DataError
from prefixtune.tasks.readers import Example

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


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
