"""The engine against Hugging Face ``generate`` on the same requests, at a short and a long context.

    python benchmarks/serve_decode.py [--model smollm2-135m|tiny] [--batch 8] [--contexts 32 2048]
                                      [--new-tokens 16] [--rounds 1] [--threads 1] [--device cpu|cuda]
                                      [--context-as-prefix]

For each context length C: --batch prompts of C - --new-tokens random tokens, exactly --new-tokens
greedy tokens each (EOS ignored), run five ways interleaved round by round: the engine with its
"preallocated" cache (the default: new columns written in place), with "dynamic" (transformers'
DynamicCache, a copy of the cache per step) and with "static" (fixed shapes, attending over the whole
capacity: the layout for CUDA graphs), and ``generate`` with its default cache and with
``cache_implementation="static"``. --compile MODE compiles the engine's decode step (``compile_decode``;
"reduce-overhead" captures CUDA graphs on a GPU) for every engine variant; the first round then includes
the compilation, so use --rounds 3 or more. Printed, as medians over rounds: end-to-end tokens/s (prefill
included), decode-only tokens/s (batch / the median time of a decode step, from each step's
timestamp: the engine's ``step()`` calls, ``generate``'s logits-processor calls), and engine /
best ``generate`` for both (target >= 1.0 on the CPU, >= 10 on a GPU), with the outputs checked equal.
Also the decode step's matmul floor: the time of the model's weight matrix products alone at this batch
(every ``nn.Linear``, the LM head included, on a (batch, in_features) input, median of 5), and the
share of each variant's decode step that it is (1.0: a step costs no more than its matrix products).

--context-as-prefix measures decode alone at context C without computing a prefill of C tokens (which
takes minutes on a busy CPU): the context is a random prefix K/V of C - 1 positions (the engine's
registered prefix; ``generate`` gets the same K/V as its ``past_key_values``) and each prompt is one
token; the static-cache ``generate`` is not run then. The same script runs on a GPU with
``--device cuda`` (bfloat16 there).
"""

from __future__ import annotations

import itertools
import json
import statistics
import time

import torch
from bench_common import load_model, parser, set_threads
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from prefixtune.core.kv import layer_kv
from prefixtune.serving.engine import Engine, EngineConfig
from prefixtune.serving.sampling import SamplingParams


class _Clock(LogitsProcessor):
    """Records the time of each of ``generate``'s steps (called once per new token)."""

    def __init__(self, sync: bool) -> None:
        self.times: list[float] = []
        self.sync = sync

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.sync:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        return scores


def matmul_floor(model: torch.nn.Module, batch: int, sync: object, reps: int = 5) -> float:
    """Seconds for one decode step's weight matmuls alone: every ``nn.Linear`` of ``model`` applied to a
    (batch, in_features) input (median of ``reps``)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weight = linears[0].weight
    inputs = {m.in_features: torch.randn(batch, m.in_features, device=weight.device, dtype=weight.dtype)
              for m in linears}
    times = []
    with torch.no_grad():
        for _ in range(reps + 1):  # the first is a warm-up
            sync()  # type: ignore[operator]
            start = time.perf_counter()
            for m in linears:
                torch.nn.functional.linear(inputs[m.in_features], m.weight)
            sync()  # type: ignore[operator]
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32, 2048])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", default="off", choices=["off", "default", "reduce-overhead", "max-autotune"],
                    help="compile_decode of the engine variants")
    ap.add_argument("--context-as-prefix", action="store_true",
                    help="the context as a random prefix K/V (no prefill of C tokens): decode alone")
    a = ap.parse_args()
    set_threads(a.threads)
    model = load_model(a.model, min_positions=max(a.contexts) + a.new_tokens + 1)
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = model.to(a.device, dtype).requires_grad_(False).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(a.seed)
    params = SamplingParams(max_new_tokens=a.new_tokens, ignore_eos=True)
    results = {}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for context in a.contexts:
        if a.context_as_prefix:
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            kv = torch.randn(context - 1, cfg.num_hidden_layers, 2, cfg.num_key_value_heads, head_dim,
                             generator=g).to(a.device, dtype) * 0.5
            prompts = torch.randint(3, cfg.vocab_size, (a.batch, 1), generator=g)
        else:
            kv = None
            prompts = torch.randint(3, cfg.vocab_size, (a.batch, context - a.new_tokens), generator=g)
        total = a.batch * a.new_tokens
        outputs: dict[str, list[list[int]]] = {}
        engines: dict[str, Engine] = {}

        def engine_run(layout: str, prompts: torch.Tensor = prompts, kv: torch.Tensor | None = kv,
                       context: int = context, engines: dict[str, Engine] = engines
                       ) -> tuple[list[list[int]], list[float]]:
            engine = engines.get(layout) or Engine(model, EngineConfig(
                max_batch_size=a.batch, max_prefill_batch=a.batch, kv_cache=layout,
                max_context=context + a.new_tokens + 1, compile_decode=a.compile))
            if a.compile != "off":
                engines[layout] = engine  # keeps its compiled step for the next rounds
            if kv is not None:
                engine.add_prefix("context", kv)
            gens = [engine.submit(p, params, None if kv is None else "context") for p in prompts.tolist()]
            stamps = [time.perf_counter()]
            while engine.step():
                sync()
                stamps.append(time.perf_counter())
            return [gen.tokens for gen in gens], stamps

        def hf_run(cache: str | None, prompts: torch.Tensor = prompts, kv: torch.Tensor | None = kv
                   ) -> tuple[list[list[int]], list[float]]:
            ids = prompts.to(a.device)
            kwargs: dict = {"cache_implementation": cache} if cache else {}
            if kv is not None:  # the context as generate's past: the same K/V as the engine's prefix
                past = DynamicCache()
                for layer in range(cfg.num_hidden_layers):
                    k, v = layer_kv(kv[None].expand(a.batch, *kv.shape), layer)
                    past.update(k.contiguous(), v.contiguous(), layer)
                ids = torch.cat([torch.zeros(a.batch, kv.shape[0], dtype=torch.long, device=a.device), ids], 1)
                kwargs["past_key_values"] = past
            clock = _Clock(cuda)
            stamps = [time.perf_counter()]
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                                 eos_token_id=None, do_sample=False, pad_token_id=0,  # EOS an ordinary token,
                                 # as the engine's ignore_eos (min_new_tokens would suppress it instead)
                                 logits_processor=LogitsProcessorList([clock]), **kwargs)
            sync()
            return out[:, ids.shape[1]:].tolist(), stamps + clock.times

        variants = {"engine preallocated": lambda: engine_run("preallocated"),
                    "engine dynamic": lambda: engine_run("dynamic"),
                    "engine static": lambda: engine_run("static"),
                    "generate default": lambda: hf_run(None)}
        if not a.context_as_prefix:
            variants["generate static"] = lambda: hf_run("static")
        rates: dict[str, list[float]] = {v: [] for v in variants}
        decode: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(a.rounds):
            for v in (list(variants) if r % 2 == 0 else list(reversed(variants))):
                sync()
                outputs[v], stamps = variants[v]()
                rates[v].append(total / (stamps[-1] - stamps[0]))
                steps = [b - x for x, b in itertools.pairwise(stamps[2:])]  # after the prefill's step and the next
                decode[v].append(a.batch / statistics.median(steps) if steps else float("nan"))
            print(f"context {context} round {r + 1}: " + ", ".join(
                f"{v} {rates[v][-1]:.1f} tok/s ({decode[v][-1]:.1f} decode)" for v in variants), flush=True)
        med = {v: statistics.median(x) for v, x in rates.items()}
        dec = {v: statistics.median(x) for v, x in decode.items()}
        hf = [v for v in variants if v.startswith("generate")]
        best, best_dec = max(med[v] for v in hf), max(dec[v] for v in hf)
        same = all(outputs[v] == outputs["generate default"] for v in variants)
        ref = outputs["generate default"]
        rows_same = {v: sum(mine == theirs for mine, theirs in zip(outputs[v], ref, strict=True)) for v in variants}
        # where a row first differs (greedy near-ties flip under different batched kernels)
        first_diff = {v: sorted(next(i for i, (x, y) in enumerate(zip(mine, theirs, strict=True)) if x != y)
                                for mine, theirs in zip(outputs[v], ref, strict=True) if mine != theirs)
                      for v in variants}
        floor = matmul_floor(model, a.batch, sync)
        results[f"context {context}"] = {
            "tokens_per_s_median (end to end)": {v: round(x, 1) for v, x in med.items()},
            "decode_tokens_per_s_median": {v: round(x, 1) for v, x in dec.items()},
            **{f"{v} / best generate, end to end": round(med[v] / best, 3) for v in variants if v.startswith("engine")},
            **{f"{v} / best generate, decode": round(dec[v] / best_dec, 3) for v in variants if v.startswith("engine")},
            "engine tokens == generate tokens (greedy)": same,
            f"rows equal to generate default's, of {a.batch}": rows_same,
            "first differing token of each differing row": {v: d for v, d in first_diff.items() if d},
            "matmul floor of a decode step (s)": round(floor, 5),
            "matmul floor / decode step": {v: round(floor * x / a.batch, 3) for v, x in dec.items()},
        }
    setup = {"model": a.model, "batch": a.batch, "new_tokens": a.new_tokens, "rounds": a.rounds,
             "threads": torch.get_num_threads(), "device": a.device, "dtype": str(dtype),
             "context_as_prefix": a.context_as_prefix, "compile_decode": a.compile}
    print(json.dumps({"setup": setup, **results}, indent=2))


if __name__ == "__main__":
    main()
