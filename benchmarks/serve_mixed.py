"""Mixed-prefix batching on the real SmolLM2-135M (CPU): one batch of many prefixes against its baselines.

    python benchmarks/serve_mixed.py [--requests 64 --new-tokens 32 --prefixes 16 --prefix-length 10 --rounds 3]
                                     [--threads N]

The same requests (random prompts of 16-48 tokens, exactly --new-tokens greedy tokens each, EOS ignored)
run four ways, interleaved round by round in one process (median tokens/s over rounds):
- mixed: the engine, requests spread round-robin over --prefixes prefixes, all in one running batch;
- one prefix: the engine, every request on the first prefix;
- no prefix: the engine on the base model;
- naive: one ``PrefixModel.generate`` call per prefix group (left-padded), groups one after the other.
Printed: mixed ÷ one prefix (target >= 0.9), mixed ÷ naive (the gain), and prefix ÷ no prefix
(target >= 0.95; decode-only tokens/s, after the first round that prefills every request, and end to
end), as ratios of throughput measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from prefixtune import PrefixConfig, attach  # noqa: E402
from prefixtune.io.hub import DEFAULT_MODEL, load_causal_lm  # noqa: E402
from prefixtune.serving.engine import Engine, EngineConfig  # noqa: E402
from prefixtune.serving.sampling import SamplingParams  # noqa: E402
from prefixtune.tasks.decode import left_pad  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefixes", type=int, default=16)
    ap.add_argument("--prefix-length", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's); 1 on a machine whose other cores are busy")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    model, _ = load_causal_lm(a.model)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(a.seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(100, vocab, (int(torch.randint(16, 49, (1,), generator=g)),), generator=g).tolist()
               for _ in range(a.requests)]
    pm = attach(model, PrefixConfig(prefix_length=a.prefix_length, reparam=False))
    tables = [torch.randn(pm.prefix.stacks["decoder"].table.shape, generator=g) * 0.5 for _ in range(a.prefixes)]
    engine = Engine(model, EngineConfig(max_batch_size=a.requests, max_waiting=a.requests,
                                        max_prefill_batch=a.requests))
    for i, table in enumerate(tables):
        with torch.no_grad():
            pm.prefix.stacks["decoder"].table.copy_(table)
        engine.add_prefix(f"p{i}", pm)
    params = SamplingParams(max_new_tokens=a.new_tokens, ignore_eos=True)
    names = {"mixed": [f"p{i % a.prefixes}" for i in range(a.requests)], "one prefix": ["p0"] * a.requests,
             "no prefix": [None] * a.requests}
    total = a.requests * a.new_tokens

    def run_engine(variant: str) -> tuple[float, float]:
        """End-to-end tokens/s, and decode-only tokens/s (after the first round, which prefills all)."""
        gens = [engine.submit(p, params, n) for p, n in zip(prompts, names[variant], strict=True)]
        start = time.perf_counter()
        engine.step()  # admits and prefills every request, then decodes once
        first = time.perf_counter()
        while engine.step():
            pass
        end = time.perf_counter()
        assert sum(len(g.tokens) for g in gens) == total
        return total / (end - start), (total - 2 * a.requests) / (end - first)

    pad = model.generation_config.pad_token_id or 0

    def run_naive() -> float:
        start = time.perf_counter()
        produced = 0
        for i, table in enumerate(tables):
            with torch.no_grad():
                pm.prefix.stacks["decoder"].table.copy_(table)
            group = [p for j, p in enumerate(prompts) if j % a.prefixes == i]
            if not group:
                continue
            ids, mask = left_pad(group, pad)
            out = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                              min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=pad)
            produced += (out.shape[1] - ids.shape[1]) * len(group)
        elapsed = time.perf_counter() - start
        assert produced == total
        return total / elapsed, float("nan")

    variants = {"mixed": lambda: run_engine("mixed"), "one prefix": lambda: run_engine("one prefix"),
                "no prefix": lambda: run_engine("no prefix"), "naive": run_naive}
    rates: dict[str, list[float]] = {v: [] for v in variants}
    decode: dict[str, list[float]] = {v: [] for v in variants}
    run_engine("mixed")  # warm-up
    for r in range(a.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # rotate against drift
        for v in order:
            e2e, dec = variants[v]()
            rates[v].append(e2e)
            decode[v].append(dec)
        print(f"round {r + 1}: " + ", ".join(f"{v} {rates[v][-1]:.1f} tok/s" for v in variants), flush=True)
    med = {v: statistics.median(x) for v, x in rates.items()}
    dec = {v: statistics.median(x) for v, x in decode.items() if v != "naive"}
    result = {
        "setup": {"model": a.model, "requests": a.requests, "new_tokens": a.new_tokens, "prefixes": a.prefixes,
                  "prefix_length": a.prefix_length, "rounds": a.rounds, "threads": torch.get_num_threads()},
        "tokens_per_s_median": {v: round(x, 1) for v, x in med.items()},
        "decode_only_tokens_per_s_median": {v: round(x, 1) for v, x in dec.items()},
        "mixed / one prefix (target >= 0.9)": round(med["mixed"] / med["one prefix"], 3),
        "mixed / naive one generate per prefix group (gain)": round(med["mixed"] / med["naive"], 2),
        "one prefix / no prefix, decode only (target >= 0.95)": round(dec["one prefix"] / dec["no prefix"], 3),
        "mixed / no prefix, decode only": round(dec["mixed"] / dec["no prefix"], 3),
        "one prefix / no prefix, end to end": round(med["one prefix"] / med["no prefix"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
