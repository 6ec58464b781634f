"""HTTP load on the OpenAI-compatible server (loopback): throughput, latency, errors, and overload.

    python benchmarks/serve_load.py [--clients 32 --requests 128 --max-tokens 16 --prefixes 8 --time-limit 300]
                                    [--threads N]

The real server (uvicorn, in a thread of this process, 127.0.0.1, a free port) serves SmolLM2-135M
with --prefixes random prefixes loaded from a prefix directory. --clients concurrent clients
(httpx, asyncio) send --requests completion requests in all (greedy, exactly --max-tokens tokens,
prefixes round-robin), stopping early at --time-limit seconds. Two phases, each with a bound on
the number of requests and on time:
- below the queue bound (max_batch_size = max_waiting = clients): target zero errors;
- above it (max_batch_size = max_waiting = clients // 8): every answer is 200 or a clean 503 with
  Retry-After (clients do not retry), nothing else.
Baseline measured in the same run: the same requests through the engine directly (no HTTP);
printed: requests/s, p50/p99 latency, error counts, and HTTP requests/s ÷ engine requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import httpx  # noqa: E402
import torch  # noqa: E402

from prefixtune import PrefixConfig, attach  # noqa: E402
from prefixtune.io.hub import DEFAULT_MODEL, load_causal_lm  # noqa: E402
from prefixtune.server.app import ServerConfig, ServerThread, create_app  # noqa: E402
from prefixtune.serving.engine import Engine, EngineConfig  # noqa: E402
from prefixtune.serving.sampling import SamplingParams  # noqa: E402

PROMPTS = ["name : Aromi | eatType : pub | area : riverside\n", "name : The Eagle | food : French\n",
           "Translate to French: the cat sleeps.\n", "Write a haiku about rain.\n"]


async def _load(url: str, bodies: list[dict], clients: int, time_limit: float) -> dict:
    """Send ``bodies`` with ``clients`` concurrent clients; statuses, latencies of 200s, wall time."""
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    retry_after_missing = 0
    queue = list(reversed(bodies))
    deadline = time.monotonic() + time_limit
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal retry_after_missing
        while queue and time.monotonic() < deadline:
            body = queue.pop()
            start = time.perf_counter()
            try:
                r = await http.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
                continue
            statuses[str(r.status_code)] += 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
            elif r.status_code in (429, 503) and "retry-after" not in r.headers:
                retry_after_missing += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(time_limit), limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"statuses": statuses, "latencies": latencies, "wall": wall, "retry_after_missing": retry_after_missing}


def _summary(run: dict) -> dict:
    lat = sorted(run["latencies"])
    ok = len(lat)
    pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))], 3)) if lat else (lambda q: None)
    errors = sum(n for s, n in run["statuses"].items() if s not in ("200", "503", "429"))
    return {"ok": ok, "statuses": dict(run["statuses"]), "errors": errors,
            "requests_per_s": round(ok / run["wall"], 2), "p50_s": pct(0.5), "p99_s": pct(0.99),
            "mean_s": round(statistics.fmean(lat), 3) if lat else None, "wall_s": round(run["wall"], 1),
            "overload_answers_without_retry_after": run["retry_after_missing"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--prefixes", type=int, default=8)
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per phase at most")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    model, tokenizer = load_causal_lm(a.model)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        prefix_dir = Path(tmp)
        pm = attach(model, PrefixConfig(prefix_length=10, reparam=False))
        for i in range(a.prefixes):
            with torch.no_grad():
                pm.prefix.stacks["decoder"].table.copy_(torch.randn(pm.prefix.stacks["decoder"].table.shape,
                                                                    generator=g) * 0.5)
            pm.save_pretrained(prefix_dir / f"task-{i}")
        pm.detach()
        model.requires_grad_(False)
        names = [f"task-{i}" for i in range(a.prefixes)]
        bodies = [{"model": names[i % a.prefixes], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": a.max_tokens,
                   "temperature": 0, "ignore_eos": True} for i in range(a.requests)]

        # baseline: the same requests straight into the engine
        engine = Engine(model, EngineConfig(max_batch_size=a.clients, max_waiting=a.requests))
        for name in names:
            engine.add_prefix(name, prefix_dir / name)
        ids = [tokenizer(b["prompt"])["input_ids"] for b in bodies]
        params = SamplingParams(max_new_tokens=a.max_tokens, ignore_eos=True)
        engine.generate(ids[: a.clients], params, [b["model"] for b in bodies[: a.clients]])  # warm-up
        start = time.perf_counter()
        engine.generate(ids, params, [b["model"] for b in bodies])
        direct_rps = a.requests / (time.perf_counter() - start)

        results = {}
        for phase, bound in [("below the queue bound", a.clients), ("above the queue bound", max(1, a.clients // 8))]:
            engine = Engine(model, EngineConfig(max_batch_size=bound, max_waiting=bound))
            app = create_app(engine, tokenizer, ServerConfig(model_name="smollm2-135m", prefix_dir=prefix_dir))
            with ServerThread(app) as server:
                run = asyncio.run(_load(server.url, bodies, a.clients, a.time_limit))
            results[phase] = {"max_batch_size": bound, "max_waiting": bound, **_summary(run)}
            print(phase, json.dumps(results[phase]), flush=True)

    below = results["below the queue bound"]
    above = results["above the queue bound"]
    print(json.dumps({
        "setup": {"model": a.model, "clients": a.clients, "requests": a.requests, "max_tokens": a.max_tokens,
                  "prefixes": a.prefixes, "threads": torch.get_num_threads()},
        "engine directly (baseline), requests/s": round(direct_rps, 2),
        "HTTP below the bound, requests/s": below["requests_per_s"],
        "HTTP / engine directly": round(below["requests_per_s"] / direct_rps, 3),
        "below the bound: p50 / p99 latency s": [below["p50_s"], below["p99_s"]],
        "below the bound: errors (target 0)": below["errors"] + sum(
            n for s, n in below["statuses"].items() if s in ("503", "429")),
        "above the bound: 200 / 503 / other": [above["statuses"].get("200", 0), above["statuses"].get("503", 0),
                                               above["errors"]],
        "above the bound: 503s without Retry-After (target 0)": above["overload_answers_without_retry_after"],
    }, indent=2))


if __name__ == "__main__":
    main()
