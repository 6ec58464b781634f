"""Plain multi-reference corpus metrics for data without an official script: sacrebleu BLEU and TER (its
defaults), and METEOR. WebNLG 2017 and DART are scored with their challenge's metrics in ``webnlg``."""

from __future__ import annotations

from collections.abc import Sequence

from sacrebleu.metrics import BLEU, TER

from prefixtune.tasks.metrics.java_meteor import MeteorScorer, meteor
from prefixtune.tasks.metrics.references import check_lengths, reference_streams


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, cased, exp smoothing), 0-100 scale."""
    check_lengths(predictions, references)
    streams = reference_streams(references)
    return float(BLEU().corpus_score(list(predictions), streams).score)


def ter(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus TER (sacrebleu defaults, multi-reference), 0-100+ scale (lower is better)."""
    check_lengths(predictions, references)
    streams = reference_streams(references)
    return float(TER().corpus_score(list(predictions), streams).score)


def generation_metrics(
    predictions: list[str],
    references: list[list[str]],
    *,
    include_meteor: bool = True,
    meteor_scorer: MeteorScorer | None = None,
) -> dict[str, float]:
    """sacrebleu ``BLEU`` and ``TER`` (0-100), and ``METEOR`` (0-1, raw strings).

    METEOR needs Java, as in `e2e_metrics`: `MeteorUnavailableError` where it cannot run; pass
    ``include_meteor=False`` to leave it out, or a running `MeteorScorer` to reuse one.
    """
    check_lengths(predictions, references)
    scores = {"BLEU": bleu(predictions, references), "TER": ter(predictions, references)}
    if include_meteor:
        scores["METEOR"] = meteor(predictions, references, meteor_scorer)
    return scores
