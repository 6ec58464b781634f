"""BLEU and NIST as ``mteval-v13a`` computes them (the E2E challenge's official Perl path)."""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence

from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from prefixtune.tasks.metrics.references import reference_streams

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_NIST_ORDER = 5
_BLEU_ORDER = 4
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


@functools.cache
def _tokenizer_13a() -> Callable[[str], str]:
    return Tokenizer13a()


def mteval_tokenize(text: str) -> list[str]:
    """Tokenize like mteval-v13a without ``-c``: ASCII lower-casing, then the 13a rules."""
    return _tokenizer_13a()(text.translate(_ASCII_LOWER)).split()


def _ngrams(tokens: Sequence[str], max_order: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for n in range(1, max_order + 1):
        counts.update(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return counts


def _bleu_from_stats(correct: Sequence[int], total: Sequence[int], sys_len: int, ref_len: int) -> float:
    """mteval-v13a BLEU: geometric mean of precisions with its default smoothing.

    An order with no matches counts as 1/(2^k * total) (k-th such order); an order the
    system has no n-grams of counts as precision 1.
    """
    if sys_len == 0:
        return 0.0
    log_sum, smooth = 0.0, 1
    for matches, count in zip(correct, total, strict=True):
        if count == 0:
            continue
        if matches == 0:
            smooth *= 2
            log_sum += math.log(1.0 / (smooth * count))
        else:
            log_sum += math.log(matches / count)
    brevity = min(0.0, 1.0 - ref_len / sys_len)
    return math.exp(log_sum / len(total) + brevity)


def mteval_bleu(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> float:
    """BLEU (0-1) of tokenized predictions against tokenized reference groups, as mteval-v13a."""
    hyps = [" ".join(tokens) for tokens in predictions]
    groups = [[" ".join(ref) for ref in group if ref] for group in references]
    metric = BLEU(tokenize="none", smooth_method="exp", max_ngram_order=_BLEU_ORDER, force=True)
    score = metric.corpus_score(hyps, reference_streams(groups))
    return _bleu_from_stats(score.counts, score.totals, score.sys_len, score.ref_len)


def _nist_information(references: Sequence[Sequence[Sequence[str]]]) -> dict[tuple[str, ...], float]:
    """Information weight of each reference n-gram: log2(count(prefix) / count(n-gram))."""
    counts: Counter[tuple[str, ...]] = Counter()
    total_words = 0
    for group in references:
        for ref in group:
            counts.update(_ngrams(ref, _NIST_ORDER))
            total_words += len(ref)
    info = {}
    for ngram, count in counts.items():
        prefix = ngram[:-1]
        # mteval uses the word total when the prefix is empty or, a Perl quirk, the string "0".
        denominator = total_words if prefix in ((), ("0",)) else counts[prefix]
        info[ngram] = math.log2(denominator / count)
    return info


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1.0:
        return 1.0
    if ratio <= 0.0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


def mteval_nist(predictions: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> float:
    """NIST (5-grams) of tokenized predictions against tokenized reference groups, as mteval-v13a."""
    info = _nist_information(references)
    gained = [0.0] * (_NIST_ORDER + 1)
    hyp_ngrams = [0] * (_NIST_ORDER + 1)
    ref_words = 0
    n_refs = 0
    for hyp, group in zip(predictions, references, strict=True):
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in group:
            for ngram, count in _ngrams(ref, _NIST_ORDER).items():
                max_ref[ngram] = max(max_ref[ngram], count)
            ref_words += len(ref)
            n_refs += bool(ref)
        for ngram, count in _ngrams(hyp, _NIST_ORDER).items():
            if ngram in max_ref:
                gained[len(ngram)] += info[ngram] * min(count, max_ref[ngram])
        for n in range(1, _NIST_ORDER + 1):
            hyp_ngrams[n] += max(len(hyp) - n + 1, 0)
    if ref_words == 0 or not predictions:
        return 0.0
    score = sum(gained[n] / max(hyp_ngrams[n], 1) for n in range(1, _NIST_ORDER + 1))
    mean_ref_words = ref_words / (n_refs / len(predictions))
    return score * _nist_length_penalty(hyp_ngrams[1] / mean_ref_words)
