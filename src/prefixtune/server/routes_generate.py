"""``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` as server-sent events).

A request's ``model`` selects its prefix (the base model's name: none). Tokenizing and submitting run
in a worker thread, so a 1 MiB prompt never stalls the event loop. Tokens come from the engine thread
through an asyncio queue; the text is assembled with stop strings (``text.py``); a stop string ends
the generation with reason "stop"; a client that disconnects cancels it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from prefixtune.errors import QueueFullError, UnknownPrefixError
from prefixtune.server.api_errors import APIError
from prefixtune.server.schemas import ChatRequest, CompletionRequest, completion_body, error_body, usage, usage_chunk
from prefixtune.server.state import ServerState, server_state
from prefixtune.server.text import TextAssembler
from prefixtune.serving.generation import Generation
from prefixtune.serving.sampling import SamplingParams

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, state: State) -> Any:
    prefix = _prefix_of(state, body.model)
    prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
    if isinstance(prompt, list):
        ids = prompt
    else:
        ids = await _tokenize(lambda: state.tokenizer(prompt)["input_ids"], "prompt")
    params = body.sampling(_max_tokens(state, body.max_tokens, "max_tokens", prefix, ids))
    return await _respond(state, request, body, prefix, ids, params, chat=False, prompt_field="prompt")


@router.post("/v1/chat/completions", response_model=None)
async def chat(body: ChatRequest, request: Request, state: State) -> Any:
    prefix = _prefix_of(state, body.model)
    tokenizer = state.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]

    def encode() -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    ids = await _tokenize(encode, "messages")
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = body.sampling(_max_tokens(state, body.requested_tokens, field, prefix, ids))
    return await _respond(state, request, body, prefix, ids, params, chat=True, prompt_field="messages")


async def _tokenize(encode: Any, field: str) -> list[int]:
    """Run ``encode()`` in a worker thread; a tokenizer or template error is a 400 naming ``field``."""
    try:
        return list(await asyncio.to_thread(encode))
    except Exception as exc:
        raise APIError(400, f"{field} could not be tokenized: {type(exc).__name__}: {exc}", param=field) from exc


def _prefix_of(state: ServerState, model: str) -> str | None:
    if model == state.config.model_name:
        return None
    if model not in state.engine.prefixes:  # O(1), however many prefixes are registered
        raise APIError(404, f"model {model!r} does not exist; GET /v1/models lists them", param="model",
                       code="model_not_found")
    return model


def _max_tokens(state: ServerState, value: int | None, field: str, prefix: str | None, ids: list[int]) -> int:
    limit = state.config.max_tokens
    if value is None:  # chat without a limit: up to config.max_tokens, as far as the context allows
        try:
            room = state.engine.max_context - len(ids) - state.engine.prefix_length(prefix)
        except UnknownPrefixError as exc:  # removed since _prefix_of() looked
            raise APIError(404, str(exc), param="model", code="model_not_found") from exc
        return max(1, min(limit, room))
    if value > limit:
        raise APIError(400, f"{field} must be <= {limit}, got {value}", param=field)
    return value


async def _respond(state: ServerState, request: Request, body: Any, prefix: str | None, ids: list[int],
                   params: SamplingParams, chat: bool, prompt_field: str) -> Any:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[int | None] = asyncio.Queue()
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def on_event(gen: Generation, token: int | None) -> None:
        loop.call_soon_threadsafe(events.put_nowait, token)

    try:  # in a thread: a cold prefix may be read from disk
        gen = await asyncio.to_thread(state.engine.submit, ids, params, prefix, rid, on_event)
    except QueueFullError as exc:
        raise APIError(503, f"server busy: {exc}", kind="server_overloaded", code="queue_full",
                       headers={"Retry-After": str(state.config.retry_after_s)}) from exc
    except UnknownPrefixError as exc:  # removed between the check and the submit
        raise APIError(404, str(exc), param="model", code="model_not_found") from exc
    except ValueError as exc:
        raise APIError(400, str(exc), param=prompt_field) from exc
    text = TextAssembler(state.tokenizer, body.stop_strings)
    pieces = _pieces(request, gen, events, text, state.config.disconnect_poll_s)
    if body.stream:
        return StreamingResponse(_sse(pieces, gen, text, rid, body, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    parts = [piece async for piece in pieces]
    if gen.finish_reason == "error":
        raise APIError(500, f"generation failed: {gen.error}", kind="server_error")
    return completion_body(rid, body.model, "".join(parts), _finish_reason(gen, text), chat, chunk=False,
                           use=usage(len(ids), len(gen.tokens)))


def _finish_reason(gen: Generation, text: TextAssembler) -> str:
    return "stop" if text.stopped or gen.finish_reason == "stop" else "length"


async def _pieces(request: Request, gen: Generation, events: asyncio.Queue[int | None], text: TextAssembler,
                  poll_s: float) -> AsyncIterator[str]:
    """The text pieces of ``gen`` as its tokens arrive; ends it on a stop string (reason "stop") or
    cancels it when the client has gone (checked at least every ``poll_s`` seconds, tokens or not)."""
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
                gen.cancel("stop")
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
    finish = _finish_reason(gen, text)
    yield event(completion_body(rid, body.model, "" if first else None, finish, chat, chunk=True, first=first))
    if body.include_usage:
        yield event(usage_chunk(rid, body.model, chat, usage(len(gen.prompt_ids), len(gen.tokens))))
    yield "data: [DONE]\n\n"
