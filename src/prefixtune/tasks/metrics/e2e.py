"""The five E2E NLG Challenge metrics, computed as the official script does (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from prefixtune.tasks.metrics.java_meteor import MeteorScorer
from prefixtune.tasks.metrics.mteval import mteval_bleu, mteval_nist, mteval_tokenize
from prefixtune.tasks.metrics.ptb import ptb_tokenize_stream
from prefixtune.tasks.metrics.references import (
    check_lengths,
    read_predictions,
    read_reference_groups_csv,
    read_reference_groups_txt,
)

E2E_METRIC_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def _coco_scores(hyps: list[str], groups: list[list[str]]) -> dict[str, float]:
    res = {index: [hyp] for index, hyp in enumerate(hyps)}
    gts = dict(enumerate(groups))
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"ROUGE_L": float(rouge), "CIDEr": float(cider)}


def e2e_metrics(
    predictions: list[str],
    references: list[list[str]],
    *,
    include_meteor: bool = True,
    meteor_scorer: MeteorScorer | None = None,
) -> dict[str, float]:
    """The E2E NLG Challenge metrics: ``BLEU, NIST, METEOR, ROUGE_L, CIDEr``.

    Scales as the official script prints them (BLEU, METEOR, ROUGE_L in 0-1). METEOR needs
    Java (`MeteorUnavailableError` otherwise); pass ``include_meteor=False`` to leave it out,
    or a running `MeteorScorer` to reuse one across calls.
    """
    check_lengths(predictions, references)
    if not predictions:
        raise ValueError("no predictions to score")
    own_scorer = MeteorScorer() if include_meteor and meteor_scorer is None else None
    try:  # the Java process loads its tables while the Python metrics run
        groups = [[ref for ref in group if ref.strip()] for group in references]
        scores = _mteval_scores(predictions, groups)
        # coco-caption tokenizes all references as one stream, and all predictions as another.
        coco_hyps = ptb_tokenize_stream(predictions)
        flat_refs = iter(ptb_tokenize_stream([ref for group in groups for ref in group]))
        coco_refs = [[next(flat_refs) for _ in group] for group in groups]
        scores.update(_coco_scores(coco_hyps, coco_refs))
        scorer = (meteor_scorer or own_scorer) if include_meteor else None
        if scorer is not None:
            scores["METEOR"] = scorer.corpus_score(coco_hyps, coco_refs)
    finally:
        if own_scorer is not None:
            own_scorer.close()
    return {name: scores[name] for name in E2E_METRIC_NAMES if name in scores}


def _mteval_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    hyps = [mteval_tokenize(hyp) for hyp in predictions]
    refs = [[mteval_tokenize(ref) for ref in group] for group in references]
    return {"BLEU": mteval_bleu(hyps, refs), "NIST": mteval_nist(hyps, refs)}


def e2e_metrics_from_files(
    predictions_path: str | Path,
    references_path: str | Path,
    *,
    include_meteor: bool = True,
    meteor_scorer: MeteorScorer | None = None,
) -> dict[str, float]:
    """`e2e_metrics` for a predictions file and a references file (``.csv`` or blank-line groups).

    Raises ValueError naming both files and both counts when they do not line up.
    """
    predictions = read_predictions(predictions_path)
    if str(references_path).lower().endswith(".csv"):
        _, references = read_reference_groups_csv(references_path)
    else:
        references = read_reference_groups_txt(references_path)
    check_lengths(predictions, references, predictions_path, references_path)
    return e2e_metrics(predictions, references, include_meteor=include_meteor, meteor_scorer=meteor_scorer)
