"""Every exception a user of ``prefixtune`` can cause, in one place.

Each derives from ``PrefixtuneError`` (so a caller can catch all of ours at once) and from the builtin
type it was before (so ``except ValueError`` keeps working). The command line prints any of them as one
line, and a distributed job passes rank 0's to every rank.
"""

from __future__ import annotations


class PrefixtuneError(Exception):
    """Base of every error that ``prefixtune`` raises on purpose; its message says what is wrong and where."""


class ConfigError(PrefixtuneError, ValueError):
    """A config field, command-line flag or saved record is invalid; the message names it."""


class DataError(PrefixtuneError, ValueError):
    """Bad or unavailable data; the message names the file, line and field where it applies."""


class ModelNotAvailableError(PrefixtuneError, FileNotFoundError):
    """A named model's package (or the weights inside it) is not installed."""


class MeteorUnavailableError(PrefixtuneError, RuntimeError):
    """METEOR cannot run: no ``java`` executable, no jar, or the Java process failed."""


class NonFiniteLossError(PrefixtuneError, RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class QueueFullError(PrefixtuneError, RuntimeError):
    """The serving engine's waiting queue is at its bound; try again later."""


class UnknownPrefixError(PrefixtuneError, LookupError):
    """A request named a prefix that is not registered."""


class RankFailedError(PrefixtuneError, RuntimeError):
    """Rank 0 of a distributed job failed; the other ranks raise this with its type name and message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"rank 0 failed with {type_name}: {message}")
        self.type_name = type_name
