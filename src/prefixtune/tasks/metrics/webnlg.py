"""BLEU, METEOR and TER for WebNLG 2017 and DART as their official evaluation computes them.

Li & Liang (2021) scored both with the DART repository's scripts (Yale-LILY/dart, commit
bb644b12ec1d0264f96a31145534b9a94f6ff5f5): ``evaluation/run_eval_on_webnlg.sh`` runs the WebNLG 2017
challenge's ``evaluation/webnlg-automatic-evaluation`` (``evaluation.py``, ``bleu_eval_3ref.sh``,
``meteor_eval.sh``, ``ter_eval.sh``), and ``evaluation/run_eval_on_dart.sh`` (with ``prepare_files.py``
and ``dart_reference/all-delex-reference{0,1,2}.lex``) scores DART. This module reimplements them:

* References: the first three of each group, in data order (the XML's ``<lex>`` order). Each is split
  on every non-word character (Python ``re.split(r'(\\W)')``, whitespace collapsed) and lower-cased; for
  WebNLG then folded to ASCII (the challenge used ``unidecode``; see `ascii_fold`). ``all-delex-
  reference*.lex`` equal this rule (without the ASCII folding) on all 5,097 DART test entries.
* Predictions: WebNLG: ASCII-folded, lower-cased, then split the same way (``evaluation.py``'s
  ``read_participant`` / ``write_to_file``, in that order). DART: ``run_eval_on_dart.sh`` scores its
  output file as it is, in the form of its example output and reference files (lower-cased and split);
  we put a prediction in that form with the DART reference rule, which leaves such an output unchanged.
* BLEU: Moses ``multi-bleu.perl`` (``-lc`` for WebNLG, none for DART) with three reference files, a
  group with fewer references having empty lines there (counted by the closest-length rule). Tokens are
  split on ASCII whitespace, lower-casing is ASCII-only, 0-100 scale.
* METEOR: ``meteor-1.5.jar ... -l en -norm -r 3`` (DART: ``-r 8``; the missing references are empty
  lines) through `MeteorScorer`, 0-1 scale.
* TER: tercom 0.7.25 (``java -jar tercom.7.25.jar -h hyp -r refs``, its defaults: case-insensitive, no
  normalisation, no punctuation removal) over the non-empty references among the first three: the
  fewest edits of any reference over the mean reference length, summed over the corpus; 0-1 scale as
  tercom prints it. The edit distance with shifts is sacrebleu's port of tercom.

``tests/tasks/test_metrics_webnlg.py`` compares all three with the official scripts' output on fixed
system outputs built from the shared WebNLG 2017 and DART test data.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from typing import Literal

from sacrebleu.metrics.lib_ter import translation_edit_rate

from prefixtune.tasks.metrics.java_meteor import MeteorScorer, meteor
from prefixtune.tasks.metrics.references import check_lengths

WebNLGData = Literal["webnlg", "dart"]
WEBNLG_DATA: tuple[WebNLGData, ...] = ("webnlg", "dart")
MAX_REFERENCES = 3  # bleu_eval_3ref.sh, meteor_eval.sh (-r 3), ter_eval.sh; run_eval_on_dart.sh likewise
_NON_WORD = re.compile(r"(\W)")
_PERL_SPACE = re.compile(r"[ \t\n\r\f\v]+")  # Perl's \s on byte strings
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# unidecode 1.4.0's ASCII for the characters of Latin-1, Latin Extended-A and common punctuation where it
# differs from "NFKD, combining marks dropped"; checked against unidecode on U+00A0-U+017F and the rest.
_ASCII = {
    "\u00a1": "!", "\u00a2": "C/", "\u00a3": "PS", "\u00a4": "$?", "\u00a5": "Y=", "\u00a6": "|",
    "\u00a7": "SS", "\u00a8": '"', "\u00a9": "(c)", "\u00ab": "<<", "\u00ac": "!", "\u00ad": "",
    "\u00ae": "(r)", "\u00af": "-", "\u00b0": "deg", "\u00b1": "+-", "\u00b4": "'", "\u00b5": "u",
    "\u00b6": "P", "\u00b7": "*", "\u00b8": ",", "\u00bb": ">>", "\u00bc": " 1/4", "\u00bd": " 1/2",
    "\u00be": " 3/4", "\u00bf": "?", "\u00c6": "AE", "\u00d0": "D", "\u00d7": "x", "\u00d8": "O",
    "\u00de": "Th", "\u00df": "ss", "\u00e6": "ae", "\u00f0": "d", "\u00f7": "/", "\u00f8": "o",
    "\u00fe": "th", "\u0110": "D", "\u0111": "d", "\u0126": "H", "\u0127": "h", "\u0131": "i",
    "\u0138": "k", "\u013f": "L", "\u0140": "l", "\u0141": "L", "\u0142": "l", "\u0149": "'n",
    "\u014a": "NG", "\u014b": "ng", "\u0152": "OE", "\u0153": "oe", "\u0166": "T", "\u0167": "t",
    "\u018f": "@", "\u0259": "@", "\u01dd": "@", "\u2010": "-", "\u2011": "-", "\u2012": "-",
    "\u2013": "-", "\u2014": "--", "\u2015": "--", "\u2018": "'", "\u2019": "'", "\u201a": ",",
    "\u201b": "'", "\u201c": '"', "\u201d": '"', "\u201e": ",,", "\u201f": '"', "\u2020": "+",
    "\u2021": "++", "\u2022": "*", "\u2030": "%0", "\u2032": "'", "\u2033": "''", "\u2039": "<",
    "\u203a": ">", "\u2044": "/", "\u20ac": "EUR", "\u2122": "(tm)", "\u2212": "-", "\u221a": "",
}  # fmt: skip


def ascii_fold(text: str) -> str:
    """ASCII transliteration as the challenge's ``unidecode`` gives it for Latin text.

    Equal to unidecode 1.4.0 on every character of the WebNLG 2017 train/dev/test and DART test data
    and on U+00A0-U+017F; any other character becomes its NFKD decomposition's ASCII part (empty where
    it has none, as unidecode does for characters it does not know; it transliterates scripts such as
    Greek or Chinese, which we drop).
    """
    if text.isascii():
        return text
    out = []
    for char in text:
        if char.isascii():
            out.append(char)
        elif char in _ASCII:
            out.append(_ASCII[char])
        else:
            out.append("".join(c for c in unicodedata.normalize("NFKD", char) if c.isascii()))
    return "".join(out)


def _split_non_word(text: str) -> str:
    return " ".join(" ".join(_NON_WORD.split(text)).split())


def reference_form(text: str, data: WebNLGData = "webnlg") -> str:
    """A reference as the official reference files hold it (split at non-word characters, lower-cased;
    WebNLG: then ASCII-folded)."""
    tokens = _split_non_word(text).lower()
    return ascii_fold(tokens) if data == "webnlg" else tokens


def prediction_form(text: str, data: WebNLGData = "webnlg") -> str:
    """A prediction as the official scripts score it (WebNLG: ASCII-folded, lower-cased, then split;
    DART: the reference rule). Line breaks become spaces (the scripts read one output per line)."""
    text = " ".join(text.split())
    if data == "webnlg":
        return _split_non_word(ascii_fold(text).lower())
    return reference_form(text, "dart")


def _perl_words(text: str) -> list[str]:
    return [word for word in _PERL_SPACE.split(text) if word]


def _ngram_counts(words: Sequence[str]) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for n in range(1, 5) for i in range(len(words) - n + 1))


def multi_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], *, lowercase: bool) -> float:
    """Corpus BLEU (0-100) as Moses ``multi-bleu.perl [-lc] ref0 ref1 ... < predictions`` computes it.

    ``references[i]`` are the lines of the reference files for prediction ``i`` (an empty string for an
    empty line: its length 0 takes part in the closest-length choice, a tie goes to the shorter).
    """
    check_lengths(predictions, references)
    correct, total = [0] * 5, [0] * 5
    hyp_length = ref_length = 0
    for prediction, group in zip(predictions, references, strict=True):
        words = _perl_words(prediction.translate(_ASCII_LOWER) if lowercase else prediction)
        clip: Counter[tuple[str, ...]] = Counter()
        closest_diff, closest_length = 9999, 9999
        for reference in group:
            ref_words = _perl_words(reference.translate(_ASCII_LOWER) if lowercase else reference)
            diff = abs(len(words) - len(ref_words))
            if diff < closest_diff:
                closest_diff, closest_length = diff, len(ref_words)
            elif diff == closest_diff:
                closest_length = min(closest_length, len(ref_words))
            clip |= _ngram_counts(ref_words)  # per n-gram, the most any one reference has
        hyp_length += len(words)
        ref_length += closest_length
        for ngram, count in _ngram_counts(words).items():
            total[len(ngram)] += count
            correct[len(ngram)] += min(count, clip[ngram])
    precisions = [correct[n] / total[n] if total[n] else 0.0 for n in range(1, 5)]
    if ref_length == 0 or hyp_length == 0 or min(precisions) == 0:
        return 0.0  # the script prints 0 (or, with no output words, dies); log(0) is -9999999999 there
    brevity = math.exp(1 - ref_length / hyp_length) if hyp_length < ref_length else 1.0
    return 100 * brevity * math.exp(sum(math.log(p) for p in precisions) / 4)


def tercom_ter(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus TER (0-1) as tercom 0.7.25 computes it with its defaults (lower-cased, whitespace tokens).

    Per prediction: the fewest edits (shifts included) of any reference, over the mean length of all
    its references; the corpus score is the summed edits over the summed lengths.
    """
    check_lengths(predictions, references)
    edits = words = 0.0
    for prediction, group in zip(predictions, references, strict=True):
        hyp = prediction.lower().split()
        results = [translation_edit_rate(hyp, reference.lower().split()) for reference in group]
        edits += min(result[0] for result in results)
        words += sum(result[1] for result in results) / len(results)
    if words == 0:
        return 1.0 if edits else 0.0
    return edits / words


def webnlg_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    data: WebNLGData = "webnlg",
    include_meteor: bool = True,
    meteor_scorer: MeteorScorer | None = None,
) -> dict[str, float]:
    """``BLEU`` (0-100), ``TER`` (0-1) and ``METEOR`` (0-1) as the WebNLG 2017 challenge (``data='webnlg'``)
    or DART's ``run_eval_on_dart.sh`` (``data='dart'``) computes them; see the module docstring.

    ``references[i]`` holds the raw references of prediction ``i`` in data order (the first three are
    used). METEOR needs Java: `MeteorUnavailableError` where it cannot run; pass ``include_meteor=False``
    to leave it out, or a running `MeteorScorer` to reuse one.
    """
    if data not in WEBNLG_DATA:
        raise ValueError(f"webnlg_metrics: data must be one of {list(WEBNLG_DATA)}, got {data!r}")
    check_lengths(predictions, references)
    hyps = [prediction_form(text, data) for text in predictions]
    refs = [[reference_form(text, data) for text in group[:MAX_REFERENCES]] for group in references]
    width = min(MAX_REFERENCES, max((len(group) for group in refs), default=0))  # reference files written
    bleu_refs = [group + [""] * (width - len(group)) for group in refs]
    present = [[ref for ref in group if ref] or [""] for group in refs]
    scores = {
        "BLEU": multi_bleu(hyps, bleu_refs, lowercase=data == "webnlg"),
        "TER": tercom_ter(hyps, present),
    }
    if include_meteor:
        scores["METEOR"] = meteor(hyps, present, meteor_scorer)
    return scores
