"""METEOR 1.5 through the ``meteor-1.5.jar`` shipped with pycocoevalcap (needs ``java``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from prefixtune.errors import MeteorUnavailableError
from prefixtune.tasks.metrics.references import check_lengths


def _meteor_jar() -> Path:
    try:
        import pycocoevalcap.meteor.meteor as coco_meteor  # only to find its jar; missing = METEOR unavailable
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
        check_lengths(predictions, references)
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

    def __enter__(self) -> MeteorScorer:
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
    check_lengths(predictions, references)
    if scorer is not None:
        return scorer.corpus_score(predictions, references)
    with MeteorScorer() as own_scorer:
        return own_scorer.corpus_score(predictions, references)


def with_optional_meteor(compute: Callable[[MeteorScorer | None], dict[str, float]]) -> dict[str, float | None]:
    """``compute(scorer)`` with a running METEOR scorer; where METEOR cannot run (no ``java``, no jar, the
    Java process failed), ``compute(None)`` with ``"METEOR": None`` and a one-line note on stderr.

    The command line's policy for every data set alike: a missing Java runtime does not throw away the
    other metrics (nor, in ``eval``, the decoded outputs), and the null says that METEOR is missing.
    """
    try:
        with MeteorScorer() as scorer:
            return compute(scorer)
    except MeteorUnavailableError as exc:
        print(f"note: METEOR left out (\"METEOR\": null): {str(exc).splitlines()[0]}", file=sys.stderr)
    return {**compute(None), "METEOR": None}
