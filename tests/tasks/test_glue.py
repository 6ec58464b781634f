"""Classification records go through the same strict row reader as the table-to-text ones: every bad row is an
error naming the file, the line and the field; the named GLUE sets keep their sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefixtune.errors import DataError
from prefixtune.tasks.glue import load_classification
from prefixtune.tasks.rows import resolve_data_root


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("a.tsv", "text\tlabel\ngood\tpos\n\tneg\n", r"a\.tsv:3: field 'text': empty text"),
    ("a.tsv", "text\tlabel\ngood\tpos\nbad\n", r"a\.tsv:3: row has 1 fields, the header has 2"),
    ("a.tsv", "sentence\tlabel\ngood\tpos\n", r"a\.tsv:1: field 'text': missing from the header"),
    ("a.csv", "text,label\ngood,pos\n\"bad,neg\n", r"a\.csv:3: malformed CSV"),
    ("a.jsonl", '{"text": "good", "label": "pos"}\n{"text": "bad"}\n', r"a\.jsonl:2: field 'label': missing"),
    ("a.jsonl", '{"text": "good", "label": "pos"}\n{"text": 3, "label": "neg"}\n',
     r"a\.jsonl:2: field 'text': expected a string"),
    ("a.jsonl", b'{"text": "good", "label": "pos"}\n{"text": "b\xffd", "label": "neg"}\n',
     r"a\.jsonl:2: field 'text': undecodable bytes"),
    ("a.txt", "text\n", r"a\.txt: unsupported file type"),
])
def test_bad_classification_rows_name_file_line_and_field(tmp_path: Path, name, content, expected) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=expected):
        load_classification(str(path), "train")


def test_unknown_label_names_the_labels_and_pair_fields_are_read(tmp_path: Path) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text('premise\thypothesis\tlabel\nit is "so"\tit is\tyes\nit is not\tit is\tno\n')
    examples, labels = load_classification(str(path), "train", text_field="premise", text_pair_field="hypothesis")
    assert labels == ("no", "yes") and [e.label for e in examples] == [1, 0]
    assert examples[0].text == 'it is "so"' and examples[0].text_pair == "it is" and examples[0].where.endswith(":2")
    with pytest.raises(DataError, match=r"pairs\.tsv:2: field 'label': 'yes' is not one of the labels \['no'\]"):
        load_classification(str(path), "train", text_field="premise", text_pair_field="hypothesis", labels=["no"])


@pytest.mark.skipif(not (resolve_data_root() / "glue").is_dir(), reason="shared GLUE data not found")
def test_named_glue_sets_keep_their_sizes_through_the_strict_reader() -> None:
    sizes = {("sst2", "train"): 67_349, ("sst2", "dev"): 872, ("rte", "train"): 2_490, ("rte", "dev"): 277,
             ("boolq", "dev"): 3_270}
    for (name, split), n in sizes.items():
        examples, labels = load_classification(name, split)
        assert len(examples) == n and len(labels) == 2, (name, split)
