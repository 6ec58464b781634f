"""Reading table-to-text data (real files where present): counts, where each example comes from, strict rows."""

from __future__ import annotations

import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from prefixtune.errors import DataError
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
def test_e2e_splits_have_the_published_example_and_source_counts(e2e_dev: list[Example]) -> None:
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
def test_e2e_where_points_at_the_csv_row_of_each_example(e2e_dev: list[Example]) -> None:
    path = Path(e2e_dev[0].where.rsplit(":", 1)[0])
    lines = path.read_text(encoding="utf-8").split("\n")
    for ex in e2e_dev:
        assert lines[_line(ex.where) - 1].startswith(f'"{ex.meta["mr"]}",'), ex.where


@needs_data
@pytest.mark.parametrize(("split", "name"), [("dev", "src1_valid.txt"), ("test", "src1_test.txt")])
def test_e2e_sources_match_li_and_liangs_preprocessed_files(split: str, name: str) -> None:
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
def test_webnlg_splits_have_the_published_counts_and_test_marks_seen_categories() -> None:
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
def test_webnlg_where_points_at_each_lex_and_train_has_its_count() -> None:
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
def test_dart_dev_and_test_load_and_the_missing_train_split_is_a_clear_error() -> None:
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


def test_linearize_triples_turns_entity_underscores_into_spaces_and_keeps_properties() -> None:
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
def test_bad_jsonl_rows_name_file_line_and_field(tmp_path: Path, content: str | bytes, match: str) -> None:
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
def test_bad_csv_rows_name_file_line_and_field(tmp_path: Path, content: str | bytes, match: str) -> None:
    path = _write(tmp_path / "rows.csv", content)
    with pytest.raises(DataError, match=match):
        load_examples(path, "ignored")


def test_jsonl_and_csv_files_read_custom_source_and_target_fields(tmp_path: Path) -> None:
    jsonl = _write(tmp_path / "rows.jsonl", '\ufeff{"x": " a ", "y": "b"}\n\n{"x": "c", "y": "d", "z": 1}\n')
    examples = load_examples(jsonl, "whatever", source_field="x", target_field="y")
    assert [(ex.source, ex.target, _line(ex.where)) for ex in examples] == [("a", "b", 1), ("c", "d", 3)]
    csv_path = _write(tmp_path / "rows.csv", 'target,source\r\n"x\r\ny",a\r\nz,b\r\n')
    examples = load_examples(csv_path, "whatever")
    assert [(ex.source, ex.target, _line(ex.where)) for ex in examples] == [("a", "x\r\ny", 2), ("b", "z", 4)]


def test_a_malformed_mr_is_an_error_and_empty_targets_are_skipped_only_on_request(tmp_path: Path) -> None:
    (tmp_path / "e2e").mkdir()
    _write(tmp_path / "e2e" / "dev.csv", 'mr,ref\n"name[A], area[x]",ok\n"name[B], area x",bad\n')
    with pytest.raises(DataError, match=r"dev\.csv:3: field 'mr': malformed MR"):
        load_examples("e2e", "dev", data_root=tmp_path)
    _write(tmp_path / "e2e" / "dev.csv", 'mr,ref\n"name[A], area[x]",ok\n"name[B]", \n')
    with pytest.warns(UserWarning, match=r"dev\.csv:3"):
        assert len(load_examples("e2e", "dev", data_root=tmp_path, on_empty_target="skip")) == 1


def test_unknown_data_and_splits_are_errors_and_the_root_follows_the_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(DataError, match="unknown data"):
        load_examples("e2e.txt", "dev")
    with pytest.raises(DataError, match="unknown split"):
        load_examples("e2e", "validation", data_root=tmp_path)
    with pytest.raises(DataError, match="file not found"):
        load_examples("e2e", "dev", data_root=tmp_path)
    monkeypatch.setenv("PREFIXTUNE_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path
    assert resolve_data_root("elsewhere") == Path("elsewhere")


def test_hf_dataset_rows_become_examples_named_by_row(monkeypatch: pytest.MonkeyPatch) -> None:
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


@needs_data
def test_evaluating_on_dart_test_drops_its_one_empty_reference_with_a_warning() -> None:
    from prefixtune.tasks.generation import DataSpec, GenerationTask

    task = GenerationTask(DataSpec(data="dart"))
    with pytest.warns(UserWarning, match=r"skipped 1 row.*test\.xml:888"):
        sources, refs = task.eval_set("test", None)
    assert len(sources) == len(refs) == 4_159
    assert sum(map(len, refs)) == 12_551 and all(ref for group in refs for ref in group)
    with pytest.raises(DataError, match="empty target"):  # training data stays strict
        task.read("test")
