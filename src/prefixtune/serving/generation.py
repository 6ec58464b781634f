"""The handle of a request submitted to the engine: the tokens it has produced, how it finished."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Literal

from prefixtune.serving.sampling import SamplingParams

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]
#: Called from the engine thread with each new token id, then once with None when the request finishes.
EventCallback = Callable[["Generation", int | None], None]


class Generation:
    """One submitted request and what it has produced so far (written by the engine only)."""

    def __init__(self, request_id: str, prompt_ids: tuple[int, ...], params: SamplingParams,
                 prefix: str | None, on_event: EventCallback | None) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.prefix = prefix
        self.tokens: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self._on_event = on_event
        self._cancel = threading.Event()
        self._cancel_reason: FinishReason = "cancelled"
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self, reason: Literal["cancelled", "stop"] = "cancelled") -> None:
        """Ask the engine to stop this request; it leaves the batch before the next step.

        reason "stop": the caller found a stop string in the text, so the request ends normally
        (finish reason and counters say "stop"); "cancelled": the client went away."""
        if not self._cancel.is_set():
            self._cancel_reason = reason
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> list[int]:
        """Block until finished; returns the generated token ids. Raises TimeoutError."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id}: not finished after {timeout} s")
        return self.tokens

    def _notify(self, token: int | None) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(self, token)
        except Exception:  # a failing listener must not stop the batch
            logger.exception("request %s: event callback failed; cancelling it", self.request_id)
            self._cancel.set()

    def _emit(self, token: int) -> None:
        self.tokens.append(token)
        self._notify(token)

    def _finish(self, reason: FinishReason, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._done.set()
        self._notify(None)
