"""Evaluation metrics for table-to-text generation.

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

`bleu`, `ter` and `meteor` are plain multi-reference corpus metrics for
WebNLG and DART (sacrebleu defaults; METEOR 1.5 on the raw strings).
"""

import contextlib
import csv
import functools
import math
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from prefixtune.errors import MeteorUnavailableError

__all__ = [
    "MeteorScorer",
    "MeteorUnavailableError",
    "bleu",
    "e2e_metrics",
    "e2e_metrics_from_files",
    "meteor",
    "mteval_bleu",
    "mteval_nist",
    "mteval_tokenize",
    "ptb_tokenize",
    "ptb_tokenize_stream",
    "read_predictions",
    "read_reference_groups_csv",
    "read_reference_groups_txt",
    "ter",
]

E2E_METRIC_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

# --------------------------------------------------------------------------- reading files

_SOURCE_COLUMNS = ("mr", "src", "source", "meaning_representation", "input")
_REFERENCE_COLUMNS = ("ref", "reference", "references", "target", "tgt", "text")
# Broken encodings of "£" and "é" seen in early E2E releases; the official script repairs them.
_MOJIBAKE = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def _fix_mojibake(text: str) -> str:
    for bad, good in _MOJIBAKE:
        text = text.replace(bad, good)
    return text


def read_predictions(path: str | Path) -> list[str]:
    """Read one prediction per line (whitespace stripped; empty lines are empty predictions)."""
    with open(path, encoding="utf-8-sig") as fh:
        return [line.strip() for line in fh]


def read_reference_groups_txt(path: str | Path) -> list[list[str]]:
    """Read references grouped by blank lines (one reference per line).

    A file without any blank line is read as single-reference data (one group per line),
    as the official E2E script does. Several blank lines in a row count as one separator
    (the official script would make empty groups of them).
    """
    groups: list[list[str]] = [[]]
    with open(path, encoding="utf-8-sig") as fh:
        for raw in fh:
            line = raw.strip()
            if line:
                groups[-1].append(line)
            elif groups[-1]:
                groups.append([])
    if not groups[-1]:
        groups.pop()
    if len(groups) == 1:
        return [[line] for line in groups[0]]
    return groups


def _find_column(header: Sequence[str], names: Sequence[str], path: str | Path) -> int:
    lowered = [name.strip().lower() for name in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    raise ValueError(f"{path}: no column named one of {list(names)} in header {list(header)}")


def read_reference_groups_csv(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Read an E2E-style CSV (``mr``, ``ref`` columns with header).

    Consecutive rows with the same source form one reference group. Returns the group sources
    in file order (a source repeated later, not consecutively, starts a new group) and the
    reference groups. Line breaks inside a reference become spaces.
    """
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{path}: empty CSV file")
    src_col = _find_column(rows[0], _SOURCE_COLUMNS, path)
    ref_col = _find_column(rows[0], _REFERENCE_COLUMNS, path)
    sources: list[str] = []
    groups: list[list[str]] = []
    for line_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= max(src_col, ref_col):
            raise ValueError(f"{path}: row {line_no} has {len(row)} columns, expected {len(rows[0])}")
        source = row[src_col]
        reference = " ".join(_fix_mojibake(row[ref_col]).split())
        if not sources or source != sources[-1]:
            sources.append(source)
            groups.append([])
        groups[-1].append(reference)
    return sources, groups


def _check_lengths(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    predictions_file: str | Path | None = None,
    references_file: str | Path | None = None,
) -> None:
    if isinstance(predictions, str):
        raise TypeError("predictions must be a list of strings, not a single string")
    if len(predictions) != len(references):
        where = ""
        if predictions_file is not None or references_file is not None:
            where = f" (predictions file {predictions_file}, references file {references_file})"
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference groups{where}")
    for index, group in enumerate(references):
        if isinstance(group, str):
            raise TypeError(f"reference group {index} is a string; expected a list of strings")
        if not any(ref.strip() for ref in group):
            raise ValueError(f"reference group {index} has no non-empty reference")


# --------------------------------------------------------------------------- sacrebleu metrics


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """Transpose per-prediction groups into sacrebleu streams, padding with None."""
    width = max((len(group) for group in references), default=0)
    return [[group[k] if k < len(group) else None for group in references] for k in range(width)]


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenizer, cased, exp smoothing), 0-100 scale."""
    from sacrebleu.metrics import BLEU

    _check_lengths(predictions, references)
    streams = _reference_streams(references)
    return float(BLEU().corpus_score(list(predictions), streams).score)


def ter(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus TER (sacrebleu defaults, multi-reference), 0-100+ scale (lower is better)."""
    from sacrebleu.metrics import TER

    _check_lengths(predictions, references)
    streams = _reference_streams(references)
    return float(TER().corpus_score(list(predictions), streams).score)


# --------------------------------------------------------------------------- MTEval BLEU / NIST

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_NIST_ORDER = 5
_BLEU_ORDER = 4
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


@functools.cache
def _tokenizer_13a() -> Callable[[str], str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

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
    from sacrebleu.metrics import BLEU

    hyps = [" ".join(tokens) for tokens in predictions]
    groups = [[" ".join(ref) for ref in group if ref] for group in references]
    metric = BLEU(tokenize="none", smooth_method="exp", max_ngram_order=_BLEU_ORDER, force=True)
    score = metric.corpus_score(hyps, _reference_streams(groups))
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


# --------------------------------------------------------------------------- PTB tokenization

# Tokens that coco-caption drops after PTB tokenization. The bracket names are upper-case
# here while the tokenizer lower-cases them, so (as in coco-caption) "-lrb-" etc. survive.
COCO_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# Words whose final period the Stanford tokenizer keeps (found by probing it, not exhaustive).
# fmt: off
_ABBREVIATIONS = frozenset([
    "mr", "mrs", "ms", "messrs", "dr", "drs", "prof", "profs", "sen", "sens", "rep", "reps", "gov", "govs",
    "gen", "lt", "col", "maj", "capt", "cmdr", "sgt", "cpl", "pvt", "adm", "rev", "hon", "jr", "sr", "st",
    "mt", "ft", "rd", "ave", "blvd", "sq", "inc", "ltd", "co", "corp", "plc", "cie", "bros", "assn", "dept",
    "univ", "est", "vs", "etc", "al", "adv", "cf", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep",
    "sept", "oct", "nov", "dec", "ala", "ariz", "ark", "calif", "colo", "conn", "del", "fla", "ga", "ill",
    "ind", "kan", "kans", "ky", "la", "md", "mass", "mich", "minn", "miss", "mo", "mont", "neb", "nev",
    "okla", "ore", "pa", "penn", "tenn", "tex", "va", "vt", "wash", "wis", "wyo"
])
# After a single letter and a period, these words start a new sentence ("plan C. The end").
_SENTENCE_STARTS = frozenset(
    ["The", "It", "Its", "This", "That", "There", "These", "Those", "They", "He", "She", "We"]
)
# fmt: on
_BRACKETS = frozenset(["-LRB-", "-RRB-", "-LSB-", "-RSB-", "-LCB-", "-RCB-"])
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m", "'em")
_SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "wanna": ("wan", "na"),
    "gotta": ("got", "ta"),
}
_KEPT_PERIOD = "\ue000"  # stands in for a period that must stay attached (as in "center.,")
_ACRONYM = re.compile(r"(?:[A-Za-z]\.)+[A-Za-z]?\.")
_PTB_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"&amp;", "&"),
        (r"&lt;", "<"),
        (r"&gt;", ">"),
        (r"&quot;|[“”„\"]", " `` "),
        (r"[‘’]", "'"),
        (r"[–—]", " -- "),
        (r"…", " ... "),
        (r"£", " # "),
        (r"[€$]", " $ "),
        (r"¢", " cents "),
        (r"¥", " ¥ "),
        (r"\(", " -LRB- "),
        (r"\)", " -RRB- "),
        (r"\[", " -LSB- "),
        (r"\]", " -RSB- "),
        (r"\{", " -LCB- "),
        (r"\}", " -RCB- "),
        (r"\.(?=,)", _KEPT_PERIOD),
        (r"(?<![^\s(])([Nn]o)\.(?=\s*\d)", "\\1" + _KEPT_PERIOD),
        (r"(\d[.:]\d+)([A-Za-z])", r"\1 \2"),
        (r"(?<!\d),|,(?!\d)", " , "),
        (r"(?<!\d):|:(?!\d)", " : "),
        (r"[;%=*|\\]|\+(?!\d)|(?<=\S)\+|(?<!\w)_|_(?!\w)", r" \g<0> "),
        (r"[!?]+", r" \g<0> "),
        (r"(?<![A-Z])&|&(?![A-Z])", " & "),
        (r"--+", " -- "),
        (r"\.\.\.+", " ... "),
        (r"((?<![^\s(])(?:[A-Za-z]\.)+)\.", r"\1 . "),
        (r"\.\.", " . . "),
        (r"(?<=[A-Za-z])\.(?=\d)", " ."),
        (r"((?<!\S)\d[\d,-]*)\.(?=[A-Za-z])", r"\1 . "),
        (r"(?<!\S)\.(?=[A-Za-z])", ". "),
    )
)


def _keeps_final_period(word: str, next_chunk: str | None) -> bool:
    stem = word[:-1]
    if len(stem) == 1 and stem.isalpha():
        return next_chunk not in _SENTENCE_STARTS
    return stem.lower() in _ABBREVIATIONS or _ACRONYM.fullmatch(word) is not None


def _split_clitics(word: str) -> list[str]:
    clitics: list[str] = []
    while True:
        lowered = word.lower()
        clitic = next((c for c in _CLITICS if lowered.endswith(c) and len(word) > len(c)), None)
        if clitic is None:
            break
        clitics.insert(0, word[-len(clitic) :])
        word = word[: -len(clitic)]
    return [*_SPLIT_WORDS.get(word.lower(), (word,)), *clitics]


def _split_chunk(chunk: str, next_chunk: str | None) -> list[str]:
    """Split one whitespace-free chunk into PTB tokens (quotes, hyphens, periods, clitics)."""
    if chunk in _BRACKETS or chunk.lower() in (*_CLITICS, "'n"):
        return [chunk]
    front: list[str] = []
    while len(chunk) > 1 and (chunk[0] in "'`" or (chunk[0] == "-" and not chunk[1].isdigit())):
        front.append(chunk[0])
        chunk = chunk[1:]
    back: list[str] = []
    while len(chunk) > 1 and chunk[-1] in ".'`-/":
        if chunk[-1] == "." and _keeps_final_period(chunk, next_chunk):
            break
        back.insert(0, chunk[-1])
        chunk = chunk[:-1]
    return [*front, *_split_clitics(chunk), *back]


def _ptb_chunks(text: str) -> list[str]:
    for pattern, replacement in _PTB_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def _ptb_tokens(chunks: list[str], next_text_chunk: str | None) -> list[str]:
    following: list[str | None] = [*chunks[1:], next_text_chunk]
    tokens = [
        token.replace(_KEPT_PERIOD, ".")
        for chunk, next_chunk in zip(chunks, following, strict=False)
        for token in _split_chunk(chunk, next_chunk)
    ]
    # Lower-case before dropping punctuation, as coco-caption does: "-lrb-" etc. stay.
    return [token.lower() for token in tokens if token.lower() not in COCO_PUNCTUATION]


def ptb_tokenize(text: str, next_text: str | None = None) -> list[str]:
    """Approximate coco-caption's tokenization: Stanford PTBTokenizer, lower-cased, punctuation dropped.

    The Java tokenizer reads all sentences as one stream, so whether a sentence-final
    "X." keeps its period depends on the next sentence; pass it as ``next_text``.
    """
    next_chunks = _ptb_chunks(next_text) if next_text else []
    return _ptb_tokens(_ptb_chunks(text), next_chunks[0] if next_chunks else None)


def ptb_tokenize_stream(texts: Sequence[str]) -> list[str]:
    """`ptb_tokenize` each text with the next one as context; tokens joined by spaces."""
    chunked = [_ptb_chunks(text) for text in texts]
    result = []
    for index, chunks in enumerate(chunked):
        later = next((c for c in chunked[index + 1 :] if c), None)
        result.append(" ".join(_ptb_tokens(chunks, later[0] if later else None)))
    return result


# --------------------------------------------------------------------------- METEOR 1.5 (Java)


def _meteor_jar() -> Path:
    try:
        import pycocoevalcap.meteor.meteor as coco_meteor
    except ImportError as exc:
        raise MeteorUnavailableError(
            "METEOR needs the meteor-1.5.jar shipped with pycocoevalcap: pip install pycocoevalcap"
        ) from exc
    jar = Path(coco_meteor.__file__).resolve().parent / "meteor-1.5.jar"
    if not jar.is_file():
        raise MeteorUnavailableError(f"METEOR jar not found at {jar} (broken pycocoevalcap install?)")
    return jar


def _meteor_field(text: str) -> str:
    return " ".join(text.replace("|||", " ").split())


class MeteorScorer:
    """A running METEOR 1.5 process (``java -jar meteor-1.5.jar - - -stdio -l en -norm``).

    Starting it loads the English paraphrase table (about 10 s), so reuse one scorer for
    several corpora. Use as a context manager or call `close`.
    """

    def __init__(self, java: str | None = None, max_heap: str = "2G") -> None:
        java_path = java or shutil.which("java")
        if java_path is None:
            raise MeteorUnavailableError(
                "METEOR 1.5 needs Java, but no 'java' executable was found on PATH. "
                "Install a Java runtime (for example openjdk-17-jre-headless) or leave METEOR out."
            )
        jar = _meteor_jar()
        command = [java_path, f"-Xmx{max_heap}", "-Dfile.encoding=UTF-8", "-jar", str(jar)]
        command += ["-", "-", "-stdio", "-l", "en", "-norm"]
        # A file, not a pipe: nobody reads stderr while the process runs. Closed in close().
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._process = subprocess.Popen(
                command, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
            )
        except OSError as exc:
            self._stderr.close()
            raise MeteorUnavailableError(f"could not start METEOR with {java_path!r}: {exc}") from exc

    def _error_output(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace").strip()[-2000:]

    def _send(self, line: str) -> None:
        assert self._process.stdin is not None
        try:
            self._process.stdin.write(line.encode("utf-8") + b"\n")
            self._process.stdin.flush()
        except BrokenPipeError as exc:
            raise MeteorUnavailableError(f"METEOR process exited: {self._error_output()}") from exc

    def _receive(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            self._process.wait()
            raise MeteorUnavailableError(
                f"METEOR process exited (code {self._process.returncode}): {self._error_output()}"
            )
        return line.decode("utf-8").strip()

    def corpus_score(self, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """Corpus METEOR (0-1) from summed segment statistics, as coco-caption computes it."""
        _check_lengths(predictions, references)
        if not predictions:
            return 0.0
        stats = []
        for hyp, group in zip(predictions, references, strict=True):
            fields = [_meteor_field(ref) for ref in group]
            self._send(" ||| ".join(["SCORE", *fields, _meteor_field(hyp)]))
            stats.append(self._receive())
        self._send(" ||| ".join(["EVAL", *stats]))
        for _ in stats:  # per-segment scores, not needed
            self._receive()
        return float(self._receive())

    def close(self) -> None:
        """Stop the Java process."""
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for stream in (self._process.stdout, self._stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> "MeteorScorer":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def meteor(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    scorer: MeteorScorer | None = None,
) -> float:
    """Corpus METEOR 1.5 (``-l en -norm``, 0-1) on the raw strings; needs ``java``."""
    _check_lengths(predictions, references)
    if scorer is not None:
        return scorer.corpus_score(predictions, references)
    with MeteorScorer() as own_scorer:
        return own_scorer.corpus_score(predictions, references)


# --------------------------------------------------------------------------- E2E metrics


def _coco_scores(hyps: list[str], groups: list[list[str]]) -> dict[str, float]:
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as exc:
        raise ImportError("ROUGE_L and CIDEr need pycocoevalcap: pip install pycocoevalcap") from exc
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
    _check_lengths(predictions, references)
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
    _check_lengths(predictions, references, predictions_path, references_path)
    return e2e_metrics(predictions, references, include_meteor=include_meteor, meteor_scorer=meteor_scorer)


def generation_metrics(
    predictions: list[str], references: list[list[str]], *, include_meteor: bool = True
) -> dict[str, float]:
    """WebNLG / DART metrics: sacrebleu ``BLEU`` and ``TER`` (0-100), and ``METEOR`` (0-1) where java exists."""
    _check_lengths(predictions, references)
    scores = {"BLEU": bleu(predictions, references), "TER": ter(predictions, references)}
    if include_meteor:
        with contextlib.suppress(MeteorUnavailableError):
            scores["METEOR"] = meteor(predictions, references)
    return scores
