"""Encoding table-to-text examples with a tiny tokenizer: the prompt is masked, policies for long examples, padding."""

from __future__ import annotations

import warnings

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from prefixtune.errors import DataError
from prefixtune.tasks.encoding import (
    IGNORE_INDEX,
    EncodedExample,
    Format,
    collate,
    encode_all,
    encode_example,
    encode_prompt,
)
from prefixtune.tasks.readers import (
    Example,
)
from prefixtune.tasks.rows import resolve_data_root

ROOT = resolve_data_root()
needs_data = pytest.mark.skipif(
    not (ROOT / "e2e").is_dir(), reason=f"shared data not found at {ROOT} (set PREFIXTUNE_DATA to its folder)"
)


def _line(where: str) -> int:
    return int(where.rsplit(":", 1)[1])




# --------------------------------------------------------------------------- encoding

_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :|\n.,"
PAD, BOS, EOS, UNK = 0, 1, 2, 3


def _tokenizer(template: str | None = None) -> PreTrainedTokenizerFast:
    """Character-level tokenizer; ``template`` like ``"<s> $A"`` makes it add specials by default."""
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
    vocab.update({c: i + 4 for i, c in enumerate(_CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    if template is not None:
        specials = [("<s>", BOS), ("</s>", EOS)]
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _char_ids(text: str) -> list[int]:
    return [_CHARS.index(c) + 4 for c in text]


EX = Example("name : A", "Hi.", "t.jsonl:7")


@pytest.mark.parametrize(("template", "bos"), [(None, []), ("<s> $A", [BOS]), ("$A </s>", [])])
def test_encode_masks_exactly_the_prompt(template: str | None, bos: list[int]) -> None:
    tok = _tokenizer(template)
    fmt = Format(separator="\n", target_prefix=" ")
    prompt = encode_prompt(tok, EX.source, fmt)
    assert prompt == bos + _char_ids("name : A") + _char_ids("\n")  # BOS iff the tokenizer adds it by default
    enc = encode_example(tok, EX, fmt, max_length=64)
    assert enc is not None
    target = [*_char_ids(" Hi."), EOS]
    assert enc.input_ids == prompt + target
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + target
    assert enc.input_ids[-1] == EOS and enc.input_ids.count(EOS) == 1
    assert (enc.where, enc.truncated) == ("t.jsonl:7", False)


def test_too_long_examples_are_refused_truncated_at_the_source_or_skipped() -> None:
    tok = _tokenizer("<s> $A")
    fmt = Format()
    full = encode_example(tok, EX, fmt, max_length=None)
    assert full is not None and len(full.input_ids) == 1 + 8 + 1 + 5
    with pytest.raises(DataError, match=r"t\.jsonl:7: 15 tokens \(prompt 10, target 5 with EOS\) > max_length 12"):
        encode_example(tok, EX, fmt, max_length=12)
    assert encode_example(tok, EX, fmt, max_length=12, on_too_long="skip") is None
    cut = encode_example(tok, EX, fmt, max_length=12, on_too_long="truncate")
    assert cut is not None and cut.truncated
    assert cut.input_ids == [BOS, *_char_ids("name \n Hi."), EOS]  # source cut, separator/target/EOS kept
    assert len(cut.input_ids) == 12
    assert cut.labels == [IGNORE_INDEX] * 7 + [*_char_ids(" Hi."), EOS]
    with pytest.raises(DataError, match="target alone does not fit"):
        encode_example(tok, EX, fmt, max_length=7, on_too_long="truncate")
    with pytest.raises(ValueError, match="on_too_long"):
        encode_example(tok, EX, fmt, max_length=7, on_too_long="drop")  # type: ignore[arg-type]


def test_encode_all_counts_and_matches_encode_example() -> None:
    tok = _tokenizer()
    fmt = Format(separator=" | ", target_prefix="")
    examples = [EX, Example("a", "b", "x:1"), Example("name : Abcdefghij", "Long.", "x:2")]
    for policy in ("skip", "truncate"):
        encoded, affected = encode_all(tok, examples, fmt, max_length=16, on_too_long=policy)
        one_by_one = [encode_example(tok, ex, fmt, 16, on_too_long=policy) for ex in examples]
        assert encoded == [e for e in one_by_one if e is not None]
        assert affected == 1
    encoded, affected = encode_all(tok, examples, fmt, max_length=None)
    assert (len(encoded), affected) == (3, 0)
    assert encode_all(tok, [], fmt, max_length=4) == ([], 0)


def test_collate_left_pads_ids_masks_and_labels() -> None:
    batch = [EncodedExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), EncodedExample([8], [8])]
    out = collate(batch, pad_id=PAD)
    assert {k: v.shape for k, v in out.items()} == {k: (2, 3) for k in ("input_ids", "attention_mask", "labels")}
    assert all(v.dtype == torch.long for v in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8]]
    # pad id equal to EOS (common for decoder-only models): the target's EOS keeps its label
    out = collate([EncodedExample([5, EOS], [IGNORE_INDEX, EOS]), EncodedExample([EOS], [EOS])], pad_id=EOS)
    assert out["labels"].tolist() == [[IGNORE_INDEX, EOS], [IGNORE_INDEX, EOS]]
    assert out["attention_mask"].tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="empty batch"):
        collate([], pad_id=PAD)


def test_an_empty_separator_and_a_tokenizer_without_eos_are_refused() -> None:
    with pytest.raises(ValueError, match="separator"):
        Format(separator="")
    tok = _tokenizer()
    tok.eos_token = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no eos_token"):
            encode_prompt(tok, "a", Format())
    assert Format() == Format(separator="\n", target_prefix=" ")
