"""An OpenAI-compatible HTTP server over the multi-prefix engine (FastAPI + uvicorn).

``create_app(engine, tokenizer, config)`` builds the app from three routers: generation
(``routes_generate``: ``POST /v1/completions``, ``POST /v1/chat/completions``, streaming as
server-sent events), information (``routes_info``: ``GET /v1/models`` with the base model and every
prefix, ``GET|HEAD /health``, ``GET /metrics`` in Prometheus text) and administration
(``routes_admin``: when the environment variable named by ``config.admin_token_env`` holds a token,
``PUT/DELETE /v1/admin/prefixes/{name}`` load a prefix from the prefix directory or drop one).

Every error has OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``, see
``api_errors.py``): unknown model 404, bad parameters 400 with the field in ``param``, body over
``max_body_bytes`` 413, queue full 503 with ``Retry-After``, unknown routes 404 and methods 405; an
unexpected exception is logged and answered as a 500 in the same shape, and every response, that 500
included, is counted in ``/metrics`` (the counter wraps the whole middleware stack).

``ServerThread`` (from ``asgi.py``) runs an app on a free port in a background thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp

from prefixtune.core.cache import Layout
from prefixtune.server.api_errors import APIError, install_error_handlers
from prefixtune.server.asgi import BodyLimit, HttpCounter, ServerThread
from prefixtune.server.config import ServerConfig
from prefixtune.server.routes_admin import load_prefix_dir, prefix_path
from prefixtune.server.routes_admin import router as admin_router
from prefixtune.server.routes_generate import router as generate_router
from prefixtune.server.routes_info import router as info_router
from prefixtune.server.state import KNOWN_PATHS, ServerState
from prefixtune.serving.engine import CompileMode, Engine, EngineConfig, PrefillMode

__all__ = ["APIError", "ServerConfig", "ServerThread", "create_app", "load_prefix_dir", "prefix_path", "serve"]

logger = logging.getLogger(__name__)


class _CountedApp(FastAPI):
    """FastAPI whose response counter sits outside Starlette's error middleware, so that the 500s
    that middleware sends for escaped exceptions are counted too."""

    def build_middleware_stack(self) -> ASGIApp:
        state: ServerState = self.state.prefixtune
        return HttpCounter(super().build_middleware_stack(), counts=state.http_counts, paths=KNOWN_PATHS)


def create_app(engine: Engine, tokenizer: Any, config: ServerConfig | None = None) -> FastAPI:
    """The HTTP app over ``engine`` (started and stopped with the app) and ``tokenizer``."""
    config = config or ServerConfig()
    state = ServerState(engine, tokenizer, config, admin_token=os.environ.get(config.admin_token_env, ""))
    if config.prefix_dir is not None:
        logger.info("loaded prefixes %s", load_prefix_dir(engine, Path(config.prefix_dir), config.model_name))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = _CountedApp(title="prefixtune", lifespan=lifespan)
    app.state.prefixtune = state
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    install_error_handlers(app)
    for router in (generate_router, info_router, admin_router):
        app.include_router(router)
    return app


_ENGINE, _SERVER = EngineConfig(), ServerConfig()  # serve()'s defaults are the dataclasses' (written once)


def serve(model: str, prefixes: str | Path | None, host: str = "127.0.0.1", port: int = 8000,
          max_batch_size: int = _ENGINE.max_batch_size, max_waiting: int = _ENGINE.max_waiting,
          max_tokens: int = _SERVER.max_tokens, max_resident_prefixes: int | None = _ENGINE.max_resident_prefixes,
          max_prefill_padding: float = _ENGINE.max_prefill_padding, kv_cache: Layout = _ENGINE.kv_cache,
          compile_decode: CompileMode = _ENGINE.compile_decode, prefill: PrefillMode = _ENGINE.prefill,
          prefill_chunk: int | None = _ENGINE.prefill_chunk) -> None:
    """Load ``model`` (a name or local folder), register the prefixes in ``prefixes``, serve until stopped.

    The keyword settings are ``EngineConfig`` / ``ServerConfig`` fields of the same names."""
    import uvicorn

    from prefixtune.io.hub import load_causal_lm

    base, tokenizer = load_causal_lm(model)
    engine = Engine(base, EngineConfig(max_batch_size=max_batch_size, max_waiting=max_waiting,
                                       max_resident_prefixes=max_resident_prefixes,
                                       max_prefill_padding=max_prefill_padding, kv_cache=kv_cache,
                                       compile_decode=compile_decode, prefill=prefill,
                                       prefill_chunk=prefill_chunk))
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(model).name)[:64] or "base"
    prefix_dir = Path(prefixes) if prefixes is not None else None
    if prefix_dir is not None and not prefix_dir.is_dir():
        raise FileNotFoundError(f"--prefixes {prefix_dir}: not a directory")
    app = create_app(engine, tokenizer, ServerConfig(model_name=name, prefix_dir=prefix_dir, max_tokens=max_tokens))
    logger.warning("serving %s with prefixes %s on http://%s:%d", name, engine.prefix_names(), host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
