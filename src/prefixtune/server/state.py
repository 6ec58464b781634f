"""What every route needs: the engine, the tokenizer, the settings and the response counter."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from prefixtune.server.config import ServerConfig
from prefixtune.serving.engine import Engine

#: Paths counted by name in /metrics (anything else is counted as "other").
KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/v1/admin/prefixes")


@dataclass
class ServerState:
    """Shared by the routes of one app (``app.state.prefixtune``)."""

    engine: Engine
    tokenizer: Any
    config: ServerConfig
    admin_token: str = ""
    http_counts: Counter[tuple[str, int]] = field(default_factory=Counter)


def server_state(request: Request) -> ServerState:
    """The FastAPI dependency giving a route its app's ``ServerState``."""
    return request.app.state.prefixtune
