"""Tests for prefixtune.tasks.metrics: official E2E scores plus small hand-checked cases."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from prefixtune.tasks import metrics
from prefixtune.tasks.metrics import (
    MeteorScorer,
    MeteorUnavailableError,
    e2e_metrics,
    e2e_metrics_from_files,
    java_meteor,
    mteval_bleu,
    mteval_nist,
    mteval_tokenize,
    ptb_tokenize,
    ptb_tokenize_stream,
    read_predictions,
    read_reference_groups_csv,
    read_reference_groups_txt,
)

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"
DATA_ROOT = Path(os.environ.get("PREFIXTUNE_DATA", DEFAULT_DATA_ROOT))
CHECKS = DATA_ROOT / "e2e" / "metric_checks"
JAVA = shutil.which("java")
NO_JAVA_REASON = "METEOR 1.5 needs a 'java' executable on PATH, and none was found"
# Tolerances from the task: the official script prints 4 decimals.
TOLERANCE = {"BLEU": 0.005, "METEOR": 0.005, "ROUGE_L": 0.005, "NIST": 0.05, "CIDEr": 0.05}


def _official_scores() -> dict[str, dict]:
    path = CHECKS / "official_scores.jsonl"
    if not path.is_file():
        pytest.skip(f"E2E metric check data not found at {CHECKS} (set PREFIXTUNE_DATA to the data folder)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {row["system"]: row for row in rows}


@pytest.fixture(scope="module")
def system_scores(meteor_scorer: MeteorScorer | None) -> dict[str, dict[str, float]]:
    """Our scores for every system listed in official_scores.jsonl."""
    results = {}
    for system, row in _official_scores().items():
        results[system] = e2e_metrics_from_files(
            CHECKS / system,
            CHECKS / row["references"],
            include_meteor=meteor_scorer is not None,
            meteor_scorer=meteor_scorer,
        )
    return results


SYSTEMS = ["template_test.txt", "human_dev.txt"]


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("metric", ["BLEU", "NIST", "ROUGE_L", "CIDEr"])
def test_e2e_metrics_match_the_official_e2e_script(system_scores: dict, system: str, metric: str) -> None:
    official = _official_scores()[system]["scores"][metric]
    assert system_scores[system][metric] == pytest.approx(official, abs=TOLERANCE[metric])


@pytest.mark.skipif(JAVA is None, reason=NO_JAVA_REASON)
@pytest.mark.parametrize("system", SYSTEMS)
def test_meteor_matches_the_official_e2e_script(system_scores: dict, system: str) -> None:
    official = _official_scores()[system]["scores"]["METEOR"]
    assert system_scores[system]["METEOR"] == pytest.approx(official, abs=TOLERANCE["METEOR"])


def test_official_reference_files_have_the_published_group_counts() -> None:
    _official_scores()
    sources, groups = read_reference_groups_csv(DATA_ROOT / "e2e" / "test.csv")
    assert len(sources) == len(groups) == 630
    assert sum(len(group) for group in groups) == 4693
    assert len(read_reference_groups_txt(CHECKS / "human_dev_refs.txt")) == 547
    assert len(read_predictions(CHECKS / "human_dev.txt")) == 547


# ----------------------------------------------------------------------------- hand-checked cases


def _bleu(prediction: str, references: list[str]) -> float:
    return mteval_bleu([mteval_tokenize(prediction)], [[mteval_tokenize(ref) for ref in references]])


def _nist(prediction: str, references: list[str]) -> float:
    return mteval_nist([mteval_tokenize(prediction)], [[mteval_tokenize(ref) for ref in references]])


def test_bleu_of_an_output_identical_to_its_reference_is_one() -> None:
    assert _bleu("The cat sat on the mat.", ["the cat sat on the mat ."]) == pytest.approx(1.0)
    # fewer than 4 tokens: mteval counts an n-gram order the output lacks as precision 1
    assert _bleu("the cat", ["the cat"]) == pytest.approx(1.0)


def test_mteval_bleu_equals_a_hand_computed_value() -> None:
    # precisions 5/6, 3/5, 1/4 and, smoothed, 1/(2*3); same length, so no brevity penalty
    expected = (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert _bleu("the cat sat on the mat", ["the cat is on the mat", "a dog"]) == pytest.approx(expected)
    # all precisions 1, closest reference has 6 words: brevity penalty exp(1 - 6/2)
    assert _bleu("the cat", ["the cat sat on the mat"]) == pytest.approx(math.exp(-2))


def test_mteval_nist_equals_a_hand_computed_value() -> None:
    # info(a) = info(b) = log2(3 words / 1); the bigram "a b" carries log2(1/1) = 0.
    # Output is 2/3 of the reference length, where NIST's length penalty is 0.5 by definition.
    assert _nist("a b", ["a b c"]) == pytest.approx(0.5 * math.log2(3))
    assert _nist("a b", ["a b"]) == pytest.approx(1.0)


def test_e2e_metrics_of_the_references_themselves_are_perfect() -> None:
    refs = [["The Eagle is a pub near Burger King."], ["Zizzi is cheap and family-friendly."]]
    scores = e2e_metrics([group[0] for group in refs], refs, include_meteor=False)
    assert list(scores) == ["BLEU", "NIST", "ROUGE_L", "CIDEr"]
    assert scores["BLEU"] == pytest.approx(1.0)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    assert scores["CIDEr"] > 0


def test_an_empty_prediction_gives_finite_scores(meteor_scorer: MeteorScorer | None) -> None:
    refs = [["The Eagle is a pub."], ["Zizzi is a cheap pub near the river."]]
    predictions = ["", "Zizzi is a cheap pub."]
    use_meteor = meteor_scorer is not None
    scores = e2e_metrics(predictions, refs, include_meteor=use_meteor, meteor_scorer=meteor_scorer)
    assert all(math.isfinite(value) and value >= 0 for value in scores.values())
    assert 0 < scores["BLEU"] < 1
    if meteor_scorer is not None:
        assert 0 < scores["METEOR"] < 1


def test_mismatched_prediction_and_reference_counts_are_an_error() -> None:
    with pytest.raises(ValueError, match="got 1 predictions but 2 reference groups"):
        e2e_metrics(["a"], [["a"], ["b"]], include_meteor=False)


def test_from_files_mismatch_names_counts_and_files(tmp_path: Path) -> None:
    predictions = tmp_path / "out.txt"
    predictions.write_text("one\ntwo\n", encoding="utf-8")
    references = tmp_path / "refs.txt"
    references.write_text("r1\nr1b\n\nr2\n\nr3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"2 predictions but 3 reference groups.*out\.txt.*refs\.txt"):
        e2e_metrics_from_files(predictions, references, include_meteor=False)


def test_meteor_without_java_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(java_meteor.shutil, "which", lambda name: None)
    with pytest.raises(MeteorUnavailableError, match="java"):
        e2e_metrics(["a cat"], [["a cat"]])
    with pytest.raises(MeteorUnavailableError, match="could not start"):
        MeteorScorer(java="/nonexistent/bin/java")


def test_bleu_and_ter_are_perfect_for_a_matching_output_and_low_for_unrelated_words() -> None:
    preds = ["The Eagle is a pub near Burger King in the city centre."]
    refs = [["The Eagle is a pub near Burger King in the city centre.", "Another one."]]
    assert metrics.bleu(preds, refs) == pytest.approx(100.0)
    assert metrics.ter(preds, refs) == pytest.approx(0.0)
    assert metrics.bleu(["Totally different words here today ."], refs) < 10


def test_mteval_and_ptb_tokenizers_split_as_the_official_tools_do() -> None:
    assert mteval_tokenize("Blue Spice, £20-25. É") == ["blue", "spice", ",", "£20", "-", "25", ".", "É"]
    text = "Prices are £20-£25, it's kid-friendly (near Mr. Smith)... city center., Yes"
    assert ptb_tokenize(text) == [
        "prices", "are", "#", "20", "#", "25", "it", "'s", "kid-friendly",
        "-lrb-", "near", "mr.", "smith", "-rrb-", "city", "center.", "yes",
    ]  # fmt: skip
    # a sentence-final "X." keeps its period unless the next sentence starts like "The ..."
    assert ptb_tokenize_stream(["Costs 20 L.", "The end.", "Costs 20 L.", "Near it."]) == [
        "costs 20 l", "the end", "costs 20 l.", "near it",
    ]  # fmt: skip
    assert ptb_tokenize("") == []


def test_csv_references_group_consecutive_rows_of_one_source(tmp_path: Path) -> None:
    path = tmp_path / "refs.csv"
    path.write_text(
        'mr,ref\nA,"first, a"\nA,"second\na"\nB,only b\nA,a again\n',
        encoding="utf-8",
    )
    sources, groups = read_reference_groups_csv(path)
    assert sources == ["A", "B", "A"]
    assert groups == [["first, a", "second a"], ["only b"], ["a again"]]


def test_txt_references_group_by_blank_lines(tmp_path: Path) -> None:
    grouped = tmp_path / "grouped.txt"
    grouped.write_text("a1\na2\n\n\nb1\n\nc1\nc2\n\n", encoding="utf-8")
    assert read_reference_groups_txt(grouped) == [["a1", "a2"], ["b1"], ["c1", "c2"]]
    single = tmp_path / "single.txt"
    single.write_text("x\ny\n", encoding="utf-8")
    assert read_reference_groups_txt(single) == [["x"], ["y"]]


def test_read_predictions_keeps_empty_lines(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("first \n\nthird\n", encoding="utf-8")
    assert read_predictions(path) == ["first", "", "third"]
