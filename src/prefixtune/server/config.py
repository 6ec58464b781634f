"""The HTTP server's settings (one frozen dataclass; the CLI's ``serve`` flags come from its fields)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class ServerConfig:
    """Bounds and names of the HTTP server.

    Attributes:
        model_name: the ``model`` id of the base model (no prefix).
        prefix_dir: folder whose sub-folders are ``save_pretrained`` prefixes, loaded at start and by
            the admin endpoint (None: no directory).
        admin_token_env: environment variable holding the admin token; unset or empty = admin off.
        max_body_bytes: larger request bodies get 413.
        max_tokens: the largest ``max_tokens`` a request may ask for.
        retry_after_s: ``Retry-After`` of a 503 when the queue is full.
        disconnect_poll_s: how often a waiting request checks whether its client is still there.
    """

    model_name: str = "base"
    prefix_dir: Path | None = None
    admin_token_env: str = "PREFIXTUNE_ADMIN_TOKEN"
    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024
    retry_after_s: int = 1
    disconnect_poll_s: float = 0.2

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.model_name):
            raise ValueError(f"model_name must match {NAME_PATTERN.pattern}, got {self.model_name!r}")
        for name in ("max_body_bytes", "max_tokens", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
