"""Loading table-to-text data (real files where present) and encoding with a tiny tokenizer."""

from __future__ import annotations

import sys
import types
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

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
    group_references,
    linearize_mr,
    linearize_triples,
    load_examples,
    shuffled_subset,
)
from prefixtune.tasks.rows import resolve_data_root

ROOT = resolve_data_root()
needs_data = pytest.mark.skipif(
    not (ROOT / "e2e").is_dir(), reason=f"shared data not found at {ROOT} (set PREFIXTUNE_DATA to its folder)"
)


def _line(where: str) -> int:
    return int(where.rsplit(":", 1)[1])


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def e2e_dev() -> list[Example]:
    return load_examples("e2e", "dev")


@needs_data
def test_e2e_counts(e2e_dev: list[Example]) -> None:
    train = load_examples("e2e", "train")
    assert len(train) == 42_061
    assert len(group_references(train)[0]) == 4_862
    assert len(e2e_dev) == 4_672
    test = load_examples("e2e", "test")
    assert len(test) == 4_693
    assert len(group_references(test)[0]) == 630
    # a ref spanning two physical lines: the next row starts two lines later
    i = next(i for i, ex in enumerate(train) if "\n" in ex.target)
    assert _line(train[i + 1].where) == _line(train[i].where) + 2


@needs_data
def test_e2e_dev_groups_equal_consecutive_grouping(e2e_dev: list[Example]) -> None:
    consecutive: list[tuple[str, list[str]]] = []
    for ex in e2e_dev:
        if not consecutive or consecutive[-1][0] != ex.source:
            consecutive.append((ex.source, []))
        consecutive[-1][1].append(ex.target)
    sources, refs = group_references(e2e_dev)
    assert len(sources) == 547
    assert list(zip(sources, refs, strict=True)) == consecutive


@needs_data
def test_e2e_where_points_at_the_row(e2e_dev: list[Example]) -> None:
    path = Path(e2e_dev[0].where.rsplit(":", 1)[0])
    lines = path.read_text(encoding="utf-8").split("\n")
    for ex in e2e_dev:
        assert lines[_line(ex.where) - 1].startswith(f'"{ex.meta["mr"]}",'), ex.where


@needs_data
@pytest.mark.parametrize(("split", "name"), [("dev", "src1_valid.txt"), ("test", "src1_test.txt")])
def test_e2e_sources_match_li_liang_files(split: str, name: str) -> None:
    """Same attribute names and order as the paper's files; they also space-tokenize values (£ 20 - 25)."""
    ours = [ex.source.replace(" ", "") for ex in load_examples("e2e", split)]
    lines = (ROOT / "e2e" / "prefixtuning_format" / name).read_text(encoding="utf-8").splitlines()
    theirs = [line.split("||")[0].replace(" ", "") for line in lines]
    assert ours == theirs


def test_linearize_mr_keeps_commas_inside_values() -> None:
    mr = "name[The Punter, Ltd], eatType[coffee shop], priceRange[£20-25], customer rating[3 out of 5]"
    expected = "name : The Punter, Ltd | Type : coffee shop | price : £20-25 | customer rating : 3 out of 5"
    assert linearize_mr(mr) == expected
    assert linearize_mr(mr, names={}).startswith("name : The Punter, Ltd | eatType : coffee shop | priceRange")
    for bad in ("name[X", "name[X], ", "name X", "name[X] area[Y]", "name[]", "name[a[b]]"):
        with pytest.raises(ValueError, match="malformed MR"):
            linearize_mr(bad)


@needs_data
def test_webnlg_counts_and_seen_split() -> None:
    dev = load_examples("webnlg", "dev")
    assert len(dev) == 2_268
    assert len({(ex.where.rsplit(":", 1)[0], ex.meta["eid"]) for ex in dev}) == 872
    assert sum(ex.meta["comment"] == "toFix" for ex in dev) == 10
    assert dev[0].source == "Aarhus : leaderName : Jacob Bundsgaard"
    assert dev[0].meta["category"] == "Airport"
    test = load_examples("webnlg", "test")
    assert len(test) == 4_928
    unseen = [ex for ex in test if ex.meta["seen"] == "unseen"]
    seen = [ex for ex in test if ex.meta["seen"] == "seen"]
    assert (len(seen), len(unseen)) == (2_495, 2_433)
    assert len({ex.meta["eid"] for ex in unseen}) == 891
    assert len({ex.meta["eid"] for ex in seen}) == 971
    # cross-check against the challenge's own unseen-only file
    root = ET.parse(ROOT / "webnlg_challenge_2017" / "test" / "testdata_unseen_with_lex.xml").getroot()
    entries = root.findall("entries/entry")
    assert len(entries) == 891
    assert {e.get("category") for e in entries} == {ex.meta["category"] for ex in unseen}
    assert {ex.meta["category"] for ex in unseen} == {
        "Artist", "Athlete", "CelestialBody", "MeanOfTransportation", "Politician"}
    assert test[0].source == "Abilene Regional Airport : cityServed : Abilene, Texas"


@needs_data
def test_webnlg_where_points_at_lex_and_train_counts() -> None:
    train = load_examples("webnlg", "train")
    assert len(train) == 18_102
    assert len({(ex.where.rsplit(":", 1)[0], ex.meta["eid"]) for ex in train}) == 6_940
    cache: dict[str, list[str]] = {}
    for ex in train[::97]:
        path, line = ex.where.rsplit(":", 1)
        lines = cache.setdefault(path, Path(path).read_text(encoding="utf-8").split("\n"))
        assert lines[int(line) - 1].lstrip().startswith("<lex"), ex.where
        assert ex.target.split()[0] in lines[int(line) - 1]


@needs_data
def test_dart_dev_test_and_missing_train() -> None:
    dev = load_examples("dart", "dev")
    assert len(dev) == 6_980
    assert dev[0].source == ("Mars Hill College : JOINED : 1973 | "
                             "Mars Hill College : LOCATION : Mars Hill, North Carolina")
    # The v1.1.1 test release has one empty annotation (<lex ... />): an error unless skipping is asked for.
    with pytest.raises(DataError, match=r"dart-v1\.1\.1-full-test\.xml:888: field 'lex': empty target"):
        load_examples("dart", "test")
    with pytest.warns(UserWarning, match=r"skipped 1 row.*test\.xml:888"):
        test = load_examples("dart", "test", on_empty_target="skip")
    assert len(test) == 12_551
    with pytest.raises(DataError, match="only DART dev and test"):
        load_examples("dart", "train")


def test_linearize_triples() -> None:
    triples = [("Aarhus_Airport", "elevationAboveTheSeaLevel_(in_metres)", "25.0"), ("A_b", "p", '"x_y"')]
    assert linearize_triples(triples) == (
        'Aarhus Airport : elevationAboveTheSeaLevel_(in_metres) : 25.0 | A b : p : "x y"')
    assert linearize_triples(triples[:1], underscores_to_spaces=False).startswith("Aarhus_Airport : ")


# --------------------------------------------------------------------------- bad files


def _write(path: Path, data: str | bytes) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"source": "a", "target": "b"}\n{"source": "c"}\n', r"\.jsonl:2: field 'target': missing"),
        ('{"source": "a", "target": "b"}\n\n{"source": "c", "target": "  "}\n',
         r"\.jsonl:3: field 'target': empty target"),
        ('{"source": "", "target": "b"}\n', r"\.jsonl:1: field 'source': empty source"),
        ('{"source": "a", "target": "b"}\n{"source": "a", "target": "b"\n', r"\.jsonl:2: malformed JSON"),
        ('["a", "b"]\n', r"\.jsonl:1: expected a JSON object"),
        ('{"source": "a", "target": 3}\n', r"\.jsonl:1: field 'target': expected a string, got int"),
        (b'{"source": "a", "target": "b"}\n{"source": "a", "target": "caf\xe9"}\n',
         r"\.jsonl:2: field 'target': undecodable bytes b'\\xe9'"),
    ],
)
def test_bad_jsonl(tmp_path: Path, content: str | bytes, match: str) -> None:
    path = _write(tmp_path / "rows.jsonl", content)
    with pytest.raises(DataError, match=match):
        load_examples(path, "ignored")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("source,tgt\na,b\n", r"\.csv:1: field 'target': missing from the header"),
        ('source,target\na,"two\nlines"\nb,""\n', r"\.csv:4: field 'target': empty target"),
        ('source,target\na,"two\nlines"\nb\n', r"\.csv:4: row has 1 fields"),
        (b'source,target\na,"two\nlines"\nb,caf\xe9\n', r"\.csv:4: field 'target': undecodable bytes"),
        (b'source,target\na,"two\n\xff lines"\nb,c\n', r"\.csv:3: field 'target': undecodable bytes b'\\xff'"),
    ],
)
def test_bad_csv(tmp_path: Path, content: str | bytes, match: str) -> None:
    path = _write(tmp_path / "rows.csv", content)
    with pytest.raises(DataError, match=match):
        load_examples(path, "ignored")


def test_good_files_and_custom_fields(tmp_path: Path) -> None:
    jsonl = _write(tmp_path / "rows.jsonl", '\ufeff{"x": " a ", "y": "b"}\n\n{"x": "c", "y": "d", "z": 1}\n')
    examples = load_examples(jsonl, "whatever", source_field="x", target_field="y")
    assert [(ex.source, ex.target, _line(ex.where)) for ex in examples] == [("a", "b", 1), ("c", "d", 3)]
    csv_path = _write(tmp_path / "rows.csv", 'target,source\r\n"x\r\ny",a\r\nz,b\r\n')
    examples = load_examples(csv_path, "whatever")
    assert [(ex.source, ex.target, _line(ex.where)) for ex in examples] == [("a", "x\r\ny", 2), ("b", "z", 4)]


def test_malformed_mr_and_skip_policy(tmp_path: Path) -> None:
    (tmp_path / "e2e").mkdir()
    _write(tmp_path / "e2e" / "dev.csv", 'mr,ref\n"name[A], area[x]",ok\n"name[B], area x",bad\n')
    with pytest.raises(DataError, match=r"dev\.csv:3: field 'mr': malformed MR"):
        load_examples("e2e", "dev", data_root=tmp_path)
    _write(tmp_path / "e2e" / "dev.csv", 'mr,ref\n"name[A], area[x]",ok\n"name[B]", \n')
    with pytest.warns(UserWarning, match=r"dev\.csv:3"):
        assert len(load_examples("e2e", "dev", data_root=tmp_path, on_empty_target="skip")) == 1


def test_unknown_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="unknown data"):
        load_examples("e2e.txt", "dev")
    with pytest.raises(DataError, match="unknown split"):
        load_examples("e2e", "validation", data_root=tmp_path)
    with pytest.raises(DataError, match="file not found"):
        load_examples("e2e", "dev", data_root=tmp_path)
    monkeypatch.setenv("PREFIXTUNE_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path
    assert resolve_data_root("elsewhere") == Path("elsewhere")


def test_hf_through_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("datasets")
    calls = []

    def load_dataset(name: str, split: str) -> list[dict[str, object]]:
        calls.append((name, split))
        return [{"source": "s1", "target": "t1"}, {"source": "s2", "target": ""}]

    fake.load_dataset = load_dataset  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"hf:org/set/validation:2: field 'target': empty target"):
        load_examples("hf:org/set", "validation")
    assert calls == [("org/set", "validation")]

    def unreachable(name: str, split: str) -> None:
        raise ConnectionError("no network")

    fake.load_dataset = unreachable  # type: ignore[attr-defined]
    with pytest.raises(DataError, match=r"Hub reachable.*no network"):
        load_examples("hf:org/set", "train")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="'datasets' package is not installed"):
        load_examples("hf:org/set", "train")


def test_shuffled_subset_is_seeded_stable_and_nested() -> None:
    examples = [Example(str(i), str(i), f"f:{i}") for i in range(10)]
    picked = [ex.source for ex in shuffled_subset(examples, 5, seed=0)]
    assert picked == ["7", "8", "1", "5", "3"]  # fixed by random.Random(0).shuffle
    assert shuffled_subset(examples, 3, seed=0) == shuffled_subset(examples, 5, seed=0)[:3]
    assert shuffled_subset(examples, 5, seed=1) != shuffled_subset(examples, 5, seed=0)
    assert [ex.source for ex in examples] == [str(i) for i in range(10)]  # input untouched
    with pytest.raises(ValueError, match="between 0 and 10"):
        shuffled_subset(examples, 11, seed=0)


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


def test_too_long_policies() -> None:
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


def test_collate_left_pads() -> None:
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


def test_format_and_missing_eos() -> None:
    with pytest.raises(ValueError, match="separator"):
        Format(separator="")
    tok = _tokenizer()
    tok.eos_token = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="no eos_token"):
            encode_prompt(tok, "a", Format())
    assert Format() == Format(separator="\n", target_prefix=" ")
