"""Resident prefixes: a batch over 32 of N registered prefixes against the same batch on one prefix, and memory.

    python benchmarks/serve_prefixes.py [--model smollm2-135m|tiny] [--registered 1000 10000] [--requests 32]
                                        [--new-tokens 32] [--prefix-length 10] [--rounds 3] [--threads 1]

For each N in --registered, N prefixes (random K/V tensors, P = --prefix-length) are registered in one
engine; the same --requests prompts (16-48 random tokens, exactly --new-tokens greedy tokens, EOS ignored)
then run two ways, interleaved round by round: "one" (every request on the first prefix) and "spread"
(each request on a different prefix drawn from the N). Printed: spread / one (target >= 0.95), and the
process's resident memory grown per registered prefix against the prefix tensor's own size (1.00 = no
overhead). ``--model tiny`` is the tests' tiny Llama (a P = 10 prefix is 3.8 KB): 10,000 SmolLM2 prefixes
would take 4.6 GB in float32, more than this shared machine should give a benchmark.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
from bench_common import load_model, parser, set_threads

from prefixtune.serving.engine import Engine, EngineConfig
from prefixtune.serving.sampling import SamplingParams


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--registered", type=int, nargs="+", default=[1000])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefix-length", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    set_threads(a.threads)
    model = load_model(a.model)
    g = torch.Generator().manual_seed(a.seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (int(torch.randint(16, 49, (1,), generator=g)),), generator=g).tolist()
               for _ in range(a.requests)]
    params = SamplingParams(max_new_tokens=a.new_tokens, ignore_eos=True)
    results = {}
    for n in a.registered:
        engine = Engine(model, EngineConfig(max_batch_size=a.requests, max_waiting=a.requests,
                                            max_prefill_batch=a.requests))
        stack = engine.spec.stack("decoder")
        shape = (a.prefix_length, stack.num_layers, 2, stack.num_kv_heads, stack.head_dim)
        before = _rss_bytes()
        for i in range(n):
            engine.add_prefix(f"p{i}", torch.randn(shape, generator=g, dtype=engine.dtype))
        grown = _rss_bytes() - before
        tensor_bytes = torch.Size(shape).numel() * torch.empty((), dtype=engine.dtype).element_size()
        spread = [f"p{int(i)}" for i in torch.randperm(n, generator=g)[: a.requests]]
        names = {"one": ["p0"] * a.requests, "spread": (spread * a.requests)[: a.requests]}

        def run(variant: str, engine: Engine = engine, names: dict = names) -> float:
            start = time.perf_counter()
            out = engine.generate(prompts, params, names[variant])
            assert sum(map(len, out)) == a.requests * a.new_tokens
            return a.requests * a.new_tokens / (time.perf_counter() - start)

        run("spread")  # warm-up
        rates: dict[str, list[float]] = {"one": [], "spread": []}
        for r in range(a.rounds):
            for v in (["one", "spread"] if r % 2 == 0 else ["spread", "one"]):
                rates[v].append(run(v))
        med = {v: statistics.median(x) for v, x in rates.items()}
        results[f"{n} registered"] = {
            "tokens_per_s_median": {v: round(x, 1) for v, x in med.items()},
            f"spread over {min(n, a.requests)} of {n} / one prefix (target >= 0.95)": round(med["spread"] / med["one"],
                                                                                          3),
            "prefix tensor bytes": tensor_bytes,
            "resident memory grown per prefix / tensor bytes": round(grown / n / tensor_bytes, 3),
            "registry bytes per prefix / tensor bytes": round(engine.prefixes.memory()["resident_bytes"] / n
                                                              / tensor_bytes, 3),
        }
        print(json.dumps({f"{n} registered": results[f"{n} registered"]}), flush=True)
        del engine
    print(json.dumps({"setup": {"model": a.model, "requests": a.requests, "new_tokens": a.new_tokens,
                                "prefix_length": a.prefix_length, "rounds": a.rounds,
                                "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype)},
                      **results}, indent=2))


if __name__ == "__main__":
    main()
