"""Evaluation metrics, one module per family: table-to-text generation and classification.

`e2e_metrics` computes the five E2E NLG Challenge metrics the way the official
script does (tuetschek/e2e-metrics, ``measure_scores.py`` with its default Perl
MTEval path):

* BLEU and NIST as ``mteval-v13a`` computes them: ASCII lower-casing, the 13a
  tokenizer, closest reference length, NIST's "exp" smoothing for BLEU,
  information weights estimated on all references for NIST (5-grams).
* METEOR 1.5, ROUGE-L and CIDEr(-D) as in coco-caption: text is PTB-tokenized,
  lower-cased and stripped of punctuation tokens first, then METEOR runs the
  ``meteor-1.5.jar`` shipped with ``pycocoevalcap`` (``-l en -norm``, needs
  ``java``), ROUGE-L and CIDEr use ``pycocoevalcap``'s scorers.

coco-caption tokenizes with the Stanford CoreNLP PTBTokenizer (Java).
`ptb_tokenize_stream` is a pure-Python approximation of it, so that only METEOR
needs Java: after punctuation removal its tokens equal the Java tokenizer's on
56,728 of the 56,730 E2E train/dev/test references and check sentences (and on
6,968 of the 6,980 DART dev references).

`webnlg_metrics` computes BLEU, METEOR and TER for WebNLG 2017 and DART the way
the challenge's scripts do (as the DART repository runs them, which Li & Liang
used): ``multi-bleu.perl`` over three reference files, METEOR 1.5 ``-l en -norm``
and tercom 0.7.25, on text split at non-word characters and lower-cased (see
``webnlg``'s docstring for every step reproduced).

`bleu`, `ter` and `meteor` are plain multi-reference corpus metrics (sacrebleu
defaults; METEOR 1.5 on the raw strings), for data without an official script.

Modules: ``references`` (predictions / reference files), ``mteval`` (BLEU, NIST), ``ptb`` (tokenizer),
``java_meteor`` (METEOR 1.5 in Java), ``e2e`` (the E2E suite), ``webnlg`` (the WebNLG 2017 / DART suite),
``sacre`` (sacrebleu BLEU / TER + METEOR),
``classification`` (accuracy, macro F1, MCC).
"""

from prefixtune.errors import MeteorUnavailableError
from prefixtune.tasks.metrics.classification import classification_metrics
from prefixtune.tasks.metrics.e2e import E2E_METRIC_NAMES, e2e_metrics, e2e_metrics_from_files
from prefixtune.tasks.metrics.java_meteor import MeteorScorer, meteor, with_optional_meteor
from prefixtune.tasks.metrics.mteval import mteval_bleu, mteval_nist, mteval_tokenize
from prefixtune.tasks.metrics.ptb import COCO_PUNCTUATION, ptb_tokenize, ptb_tokenize_stream
from prefixtune.tasks.metrics.references import read_predictions, read_reference_groups_csv, read_reference_groups_txt
from prefixtune.tasks.metrics.sacre import bleu, generation_metrics, ter
from prefixtune.tasks.metrics.webnlg import WEBNLG_DATA, multi_bleu, tercom_ter, webnlg_metrics

__all__ = [
    "COCO_PUNCTUATION",
    "E2E_METRIC_NAMES",
    "WEBNLG_DATA",
    "MeteorScorer",
    "MeteorUnavailableError",
    "bleu",
    "classification_metrics",
    "e2e_metrics",
    "e2e_metrics_from_files",
    "generation_metrics",
    "meteor",
    "mteval_bleu",
    "mteval_nist",
    "mteval_tokenize",
    "multi_bleu",
    "ptb_tokenize",
    "ptb_tokenize_stream",
    "read_predictions",
    "read_reference_groups_csv",
    "read_reference_groups_txt",
    "ter",
    "tercom_ter",
    "webnlg_metrics",
    "with_optional_meteor",
]
