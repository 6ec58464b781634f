"""A pure-Python approximation of coco-caption's Stanford PTBTokenizer (lower-cased, punctuation dropped)."""

from __future__ import annotations

import re
from collections.abc import Sequence

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
