"""The engine against Hugging Face ``generate`` on the same requests, at a short and a long context.

    python benchmarks/serve_decode.py [--model smollm2-135m|tiny] [--batch 8] [--contexts 32 2048]
                                      [--new-tokens 16] [--rounds 1] [--threads 1] [--device cpu|cuda]

For each context length C: --batch prompts of C - --new-tokens random tokens, exactly --new-tokens
greedy tokens each (EOS ignored), run four ways interleaved round by round: the engine with its
"dynamic" cache (transformers' DynamicCache, the default) and with "preallocated", and ``generate``
with its default cache and with ``cache_implementation="static"``. Printed: tokens/s (prefill included)
and engine / best ``generate`` (target >= 1.0 on the CPU, >= 10 on a GPU), with the outputs checked
equal. The same script runs on a GPU with ``--device cuda`` (bfloat16 there).
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from bench_common import load_model, parser, set_threads

from prefixtune.serving.engine import Engine, EngineConfig
from prefixtune.serving.sampling import SamplingParams


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32, 2048])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    set_threads(a.threads)
    model = load_model(a.model, min_positions=max(a.contexts) + 1)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    model = model.to(a.device, dtype).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(a.seed)
    vocab = model.config.vocab_size
    params = SamplingParams(max_new_tokens=a.new_tokens, ignore_eos=True)
    results = {}
    for context in a.contexts:
        prompts = torch.randint(3, vocab, (a.batch, context - a.new_tokens), generator=g)
        total = a.batch * a.new_tokens
        outputs: dict[str, list[list[int]]] = {}

        def engine_run(layout: str, prompts: torch.Tensor = prompts, context: int = context) -> list[list[int]]:
            engine = Engine(model, EngineConfig(max_batch_size=a.batch, max_prefill_batch=a.batch, kv_cache=layout,
                                                max_context=context + 1))
            return engine.generate(prompts.tolist(), params)

        def hf_run(cache: str | None, prompts: torch.Tensor = prompts) -> list[list[int]]:
            ids = prompts.to(a.device)
            kwargs = {"cache_implementation": cache} if cache else {}
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                                 min_new_tokens=a.new_tokens, do_sample=False, pad_token_id=0, **kwargs)
            return out[:, ids.shape[1]:].tolist()

        variants = {"engine preallocated": lambda: engine_run("preallocated"),
                    "engine dynamic": lambda: engine_run("dynamic"),
                    "generate default": lambda: hf_run(None), "generate static": lambda: hf_run("static")}
        rates: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(a.rounds):
            for v in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                outputs[v] = variants[v]()
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                rates[v].append(total / (time.perf_counter() - start))
            print(f"context {context} round {r + 1}: " + ", ".join(f"{v} {x[-1]:.1f} tok/s" for v, x in rates.items()),
                  flush=True)
        med = {v: statistics.median(x) for v, x in rates.items()}
        best = max(med["generate default"], med["generate static"])
        same = outputs["engine preallocated"] == outputs["generate default"] == outputs["engine dynamic"]
        results[f"context {context}"] = {
            "tokens_per_s_median": {v: round(x, 1) for v, x in med.items()},
            "engine preallocated / best generate": round(med["engine preallocated"] / best, 3),
            "engine dynamic / best generate": round(med["engine dynamic"] / best, 3),
            "engine preallocated / engine dynamic": round(med["engine preallocated"] / med["engine dynamic"], 3),
            "engine tokens == generate tokens (greedy)": same,
        }
    print(json.dumps({"setup": {"model": a.model, "batch": a.batch, "new_tokens": a.new_tokens, "rounds": a.rounds,
                                "threads": torch.get_num_threads(), "device": a.device, "dtype": str(dtype)},
                      **results}, indent=2))


if __name__ == "__main__":
    main()
