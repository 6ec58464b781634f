"""Token ids → text pieces safe to send, with stop strings (incremental detokenization)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class TextAssembler:
    """Token ids → text pieces safe to send, with stop strings.

    The whole output is decoded each time (tokenizers join pieces differently than they decode
    them one by one). A decoded text that ends in U+FFFD may be a multi-byte character still
    incomplete: that tail is neither sent nor searched for stop strings until the next token shows
    what it is (or ``finish``, where it is final). Text that may still become a stop string is held
    back too.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.tokens: list[int] = []
        self.sent = 0
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """Append one token; returns the new text to send (possibly ''). Sets ``stopped``."""
        self.tokens.append(token)
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        settled = self.text.rstrip(REPLACEMENT)  # a trailing U+FFFD may be half a character
        if self._cut(settled):
            return self._take(len(self.text))
        if len(settled) < len(self.text):
            return self._take(len(settled) - self.hold)
        return self._take(len(self.text) - self.hold)

    def finish(self) -> str:
        """Everything not sent yet (the text is final: stop strings are searched in all of it)."""
        if not self.stopped:
            self._cut(self.text)
        return self._take(len(self.text))

    def _cut(self, text: str) -> bool:
        """If ``text`` holds a stop string (beyond what was sent), cut ``self.text`` before the first one."""
        start = max(0, self.sent - self.hold)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if not hits:
            return False
        self.stopped = True
        self.text = text[: min(hits)]
        return True

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece
