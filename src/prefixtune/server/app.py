"""An OpenAI-compatible HTTP server over the multi-prefix engine (FastAPI + uvicorn).

``create_app(engine, tokenizer, config)`` builds the app: ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` as server-sent events), ``GET /v1/models`` (the base
model and every prefix; a request's ``model`` field selects its prefix), ``GET /health``,
``GET /metrics`` (Prometheus text), and, when the environment variable named by
``config.admin_token_env`` holds a token, ``PUT/DELETE /v1/admin/prefixes/{name}`` to load a prefix
from the prefix directory or drop one at run time.

``ServerThread`` (from ``asgi.py``) runs an app on a free port in a background thread.

Prefix names are ``[A-Za-z0-9._-]{1,64}`` (not ``.`` or ``..``) and resolve to a folder directly
inside the prefix directory, whose files must not point outside it. Errors use OpenAI's shape
(``{"error": {"message", "type", "param", "code"}}``): unknown model 404, bad parameters 400 with the
field in ``param``, body over ``max_body_bytes`` 413, queue full 503 with ``Retry-After``. A client
that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from prefixtune.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from prefixtune.server.asgi import BodyLimit, HttpCounter, ServerThread
from prefixtune.server.schemas import (
    ChatRequest,
    CompletionRequest,
    TextAssembler,
    completion_body,
    error_body,
    usage,
    usage_chunk,
)
from prefixtune.serving.engine import Engine, Generation, QueueFullError, UnknownPrefixError

__all__ = ["APIError", "ServerConfig", "ServerThread", "create_app", "load_prefix_dir", "prefix_path", "serve"]

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
KNOWN_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/v1/admin/prefixes")


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


class APIError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), self.status,
                            headers=self.headers)


def prefix_path(root: Path, name: str) -> Path:
    """The folder of prefix ``name``, directly inside ``root``; APIError 400 for a bad name, 404 if absent.

    Nothing outside ``root`` is reached: the name cannot hold a separator, ``.`` and ``..`` are refused,
    and the folder and its two files must resolve inside ``root``."""
    if not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise APIError(400, f"prefix name {name!r} must match {NAME_PATTERN.pattern} (and not be '.' or '..')",
                       param="name")
    base = root.resolve()
    folder = (base / name).resolve()
    if folder.parent != base or not folder.is_dir():
        raise APIError(404, f"no prefix folder {name!r} in the prefix directory", param="name", code="not_found")
    for file in (CONFIG_NAME, WEIGHTS_NAME):
        if (folder / file).resolve().parent != folder:
            raise APIError(400, f"prefix {name!r}: {file} points outside its folder", param="name")
    return folder


def load_prefix_dir(engine: Engine, root: Path, model_name: str) -> list[str]:
    """Register every valid prefix folder directly inside ``root``; returns the names (bad ones are logged)."""
    loaded = []
    for entry in sorted(root.iterdir()):
        if not (entry / CONFIG_NAME).is_file():
            continue
        try:
            if entry.name == model_name:
                raise APIError(409, f"prefix {entry.name!r} has the base model's name", param="name")
            engine.add_prefix(entry.name, prefix_path(root, entry.name))
            loaded.append(entry.name)
        except (APIError, ValueError, FileNotFoundError, KeyError) as exc:
            logger.warning("skipping prefix folder %s: %s", entry, getattr(exc, "message", exc))
    return loaded


def create_app(engine: Engine, tokenizer: Any, config: ServerConfig | None = None) -> FastAPI:
    """The HTTP app over ``engine`` (started and stopped with the app) and ``tokenizer``."""
    from contextlib import asynccontextmanager

    config = config or ServerConfig()
    token = os.environ.get(config.admin_token_env, "")
    http_counts: Counter[tuple[str, int]] = Counter()
    if config.prefix_dir is not None:
        logger.info("loaded prefixes %s", load_prefix_dir(engine, Path(config.prefix_dir), config.model_name))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="prefixtune", lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(HttpCounter, counts=http_counts, paths=KNOWN_PATHS)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return APIError(400, "request body is not valid JSON").response()
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=param).response()

    def prefix_of(model: str) -> str | None:
        if model == config.model_name:
            return None
        if model not in engine.prefix_names():
            raise APIError(404, f"model {model!r} does not exist; GET /v1/models lists them", param="model",
                           code="model_not_found")
        return model

    def max_tokens_of(value: int | None, field: str, prefix: str | None, ids: list[int]) -> int:
        if value is None:  # chat without a limit: up to config.max_tokens, as far as the context allows
            try:
                room = engine.max_context - len(ids) - engine.prefix_length(prefix)
            except UnknownPrefixError as exc:  # removed since prefix_of() looked
                raise APIError(404, str(exc), param="model", code="model_not_found") from exc
            return max(1, min(config.max_tokens, room))
        if value > config.max_tokens:
            raise APIError(400, f"{field} must be <= {config.max_tokens}, got {value}", param=field)
        return value

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = engine.stats()
        return {"status": "ok", "waiting": stats.waiting, "running": stats.running}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_prometheus(engine, http_counts), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [config.model_name, *engine.prefix_names()]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "prefixtune"}
                                           for n in names]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        prefix = prefix_of(body.model)
        prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
        ids = prompt if isinstance(prompt, list) else tokenizer(prompt)["input_ids"]
        params = body.sampling(max_tokens_of(body.max_tokens, "max_tokens", prefix, ids))
        return await _respond(request, body, prefix, ids, params, chat=False, prompt_field="prompt")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, request: Request) -> Any:
        prefix = prefix_of(body.model)
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        params = body.sampling(max_tokens_of(body.requested_tokens, field, prefix, ids))
        return await _respond(request, body, prefix, ids, params, chat=True, prompt_field="messages")

    async def _respond(request: Request, body: Any, prefix: str | None, ids: list[int], params: Any, chat: bool,
                       prompt_field: str) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[int | None] = asyncio.Queue()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

        def on_event(gen: Generation, token: int | None) -> None:
            loop.call_soon_threadsafe(events.put_nowait, token)

        try:
            gen = engine.submit(ids, params, prefix, request_id=rid, on_event=on_event)
        except QueueFullError as exc:
            raise APIError(503, f"server busy: {exc}", kind="server_overloaded", code="queue_full",
                           headers={"Retry-After": str(config.retry_after_s)}) from exc
        except UnknownPrefixError as exc:  # removed between the check and the submit
            raise APIError(404, str(exc), param="model", code="model_not_found") from exc
        except ValueError as exc:
            raise APIError(400, str(exc), param=prompt_field) from exc
        text = TextAssembler(tokenizer, body.stop_strings)
        pieces = _pieces(request, gen, events, text, config.disconnect_poll_s)
        if body.stream:
            return StreamingResponse(_sse(pieces, gen, text, rid, body, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        parts = [piece async for piece in pieces]
        if gen.finish_reason == "error":
            raise APIError(500, f"generation failed: {gen.error}", kind="server_error")
        finish = "stop" if text.stopped or gen.finish_reason == "stop" else "length"
        return completion_body(rid, body.model, "".join(parts), finish, chat, chunk=False,
                               use=usage(len(ids), len(gen.tokens)))

    @app.put("/v1/admin/prefixes/{name}")
    async def add_prefix(name: str, request: Request) -> dict[str, Any]:
        _check_admin(request, token, config)
        if name == config.model_name:
            raise APIError(409, f"prefix {name!r} would hide the base model", param="name")
        folder = prefix_path(Path(config.prefix_dir), name)  # type: ignore[arg-type]
        try:
            length = await asyncio.to_thread(engine.add_prefix, name, folder)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            raise APIError(400, f"prefix {name!r}: {exc}", param="name") from exc
        return {"id": name, "object": "model", "prefix_length": length}

    @app.delete("/v1/admin/prefixes/{name}")
    async def remove_prefix(name: str, request: Request) -> dict[str, Any]:
        _check_admin(request, token, config)
        try:
            engine.remove_prefix(name)
        except UnknownPrefixError as exc:
            raise APIError(404, f"model {name!r} does not exist", param="name", code="model_not_found") from exc
        return {"id": name, "object": "model", "deleted": True}

    return app


def _check_admin(request: Request, token: str, config: ServerConfig) -> None:
    if not token or config.prefix_dir is None:
        raise APIError(404, f"the admin endpoint is off (set {config.admin_token_env} and a prefix directory)",
                       code="not_found")
    given = request.headers.get("authorization", "")
    if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise APIError(401, "missing or wrong admin token (Authorization: Bearer ...)", kind="authentication_error")


async def _pieces(request: Request, gen: Generation, events: asyncio.Queue[int | None], text: TextAssembler,
                  poll_s: float) -> AsyncIterator[str]:
    """The text pieces of ``gen`` as its tokens arrive; cancels it on a stop string or when the
    client has gone (checked at least every ``poll_s`` seconds, tokens or not)."""
    checked = time.monotonic()
    try:
        while True:
            try:
                token = await asyncio.wait_for(events.get(), timeout=poll_s)
            except TimeoutError:
                token = -1
            if time.monotonic() - checked >= poll_s:
                if await request.is_disconnected():
                    return
                checked = time.monotonic()
            if token == -1:
                continue
            if token is None:
                if tail := text.finish():
                    yield tail
                return
            if text.stopped:
                continue  # tokens already on their way after a stop string
            if piece := text.add(token):
                yield piece
            if text.stopped:
                gen.cancel()
                return
    finally:
        if not gen.done:
            gen.cancel()


async def _sse(pieces: AsyncIterator[str], gen: Generation, text: TextAssembler, rid: str, body: Any,
               chat: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text piece, a closing chunk, usage if asked, ``[DONE]``."""
    def event(data: dict[str, Any]) -> str:
        return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

    first = True
    async for piece in pieces:
        yield event(completion_body(rid, body.model, piece, None, chat, chunk=True, first=first))
        first = False
    if gen.finish_reason == "error":
        yield event(error_body(f"generation failed: {gen.error}", "server_error"))
        return
    finish = "stop" if text.stopped or gen.finish_reason == "stop" else "length"
    yield event(completion_body(rid, body.model, "" if first else None, finish, chat, chunk=True, first=first))
    if body.include_usage:
        yield event(usage_chunk(rid, body.model, chat, usage(len(gen.prompt_ids), len(gen.tokens))))
    yield "data: [DONE]\n\n"


def _prometheus(engine: Engine, http_counts: Counter[tuple[str, int]]) -> str:
    """The Prometheus text exposition of the engine's and the server's counters."""
    stats = engine.stats()
    c = stats.counters
    lines = ["# TYPE prefixtune_requests_total counter"]
    for outcome in ("submitted", "rejected", "length", "stop", "cancelled", "error"):
        lines.append(f'prefixtune_requests_total{{outcome="{outcome}"}} {c.get("requests_" + outcome, 0)}')
    for name, key, kind in [("prefixtune_prompt_tokens_total", "prompt_tokens", "counter"),
                            ("prefixtune_generated_tokens_total", "generated_tokens", "counter"),
                            ("prefixtune_decode_steps_total", "steps", "counter"),
                            ("prefixtune_decoded_rows_total", "decoded_rows", "counter")]:
        lines += [f"# TYPE {name} {kind}", f"{name} {c.get(key, 0)}"]
    lines += ["# TYPE prefixtune_queue_depth gauge", f"prefixtune_queue_depth {stats.waiting}",
              "# TYPE prefixtune_batch_size gauge", f"prefixtune_batch_size {stats.running}",
              "# TYPE prefixtune_prefixes gauge", f"prefixtune_prefixes {len(engine.prefix_names())}",
              "# TYPE prefixtune_http_responses_total counter"]
    lines += [f'prefixtune_http_responses_total{{path="{p}",status="{s}"}} {n}'
              for (p, s), n in sorted(http_counts.items())]
    return "\n".join(lines) + "\n"


def serve(model: str, prefixes: str | Path | None, host: str = "127.0.0.1", port: int = 8000,
          max_batch_size: int = 32, max_waiting: int = 256, max_tokens: int = 1024) -> None:
    """Load ``model`` (a name or local folder), register the prefixes in ``prefixes``, serve until stopped."""
    import uvicorn

    from prefixtune.io.hub import load_causal_lm
    from prefixtune.serving.engine import EngineConfig

    base, tokenizer = load_causal_lm(model)
    engine = Engine(base, EngineConfig(max_batch_size=max_batch_size, max_waiting=max_waiting))
    name = re.sub(r"[^A-Za-z0-9._-]", "-", Path(model).name)[:64] or "base"
    prefix_dir = Path(prefixes) if prefixes is not None else None
    if prefix_dir is not None and not prefix_dir.is_dir():
        raise FileNotFoundError(f"--prefixes {prefix_dir}: not a directory")
    app = create_app(engine, tokenizer, ServerConfig(model_name=name, prefix_dir=prefix_dir, max_tokens=max_tokens))
    logger.warning("serving %s with prefixes %s on http://%s:%d", name, engine.prefix_names(), host, port)
    uvicorn.run(app, host=host, port=port, log_level="info")
