"""``GET /v1/models``, ``GET|HEAD /health``, ``GET /metrics`` (Prometheus text)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from prefixtune.server.state import ServerState, server_state

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]


@router.api_route("/health", methods=["GET", "HEAD"])
async def health(state: State) -> dict[str, Any]:
    stats = state.engine.stats()
    return {"status": "ok", "waiting": stats.waiting, "running": stats.running}


@router.get("/metrics")
async def metrics(state: State) -> PlainTextResponse:
    return PlainTextResponse(prometheus(state), media_type="text/plain; version=0.0.4")


@router.get("/v1/models")
async def models(state: State) -> dict[str, Any]:
    names = [state.config.model_name, *state.engine.prefix_names()]
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "prefixtune"}
                                       for n in names]}


def prometheus(state: ServerState) -> str:
    """The Prometheus text exposition of the engine's and the server's counters."""
    engine = state.engine
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
    memory = engine.prefixes.memory()
    lines += ["# TYPE prefixtune_queue_depth gauge", f"prefixtune_queue_depth {stats.waiting}",
              "# TYPE prefixtune_batch_size gauge", f"prefixtune_batch_size {stats.running}",
              "# TYPE prefixtune_prefixes gauge", f"prefixtune_prefixes {len(engine.prefix_names())}",
              "# TYPE prefixtune_resident_prefix_bytes gauge",
              f"prefixtune_resident_prefix_bytes {memory['resident_bytes']}",
              "# TYPE prefixtune_http_responses_total counter"]
    lines += [f'prefixtune_http_responses_total{{path="{p}",status="{s}"}} {n}'
              for (p, s), n in sorted(state.http_counts.items())]
    return "\n".join(lines) + "\n"
