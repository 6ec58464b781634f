"""Prefill without padding waste: joining prompts of mixed lengths against the same total at equal lengths.

    python benchmarks/serve_prefill.py [--model smollm2-135m|tiny] [--prompts 16] [--min-len 16] [--max-len 512]
                                       [--rounds 2] [--threads 1] [--engines packed grouped padded]
                                       [--ttft-long 0] [--chunk 64]

--prompts random prompts of --min-len..--max-len tokens join an idle engine at once ("mixed"), and as
many prompts of their mean length ("equal", the same total within --prompts tokens); each request
asks for one token, so a step is its prefill. Three engines: "packed" (the default: all prompts in one
packed row), "grouped" (``prefill="grouped"``: groups of similar length, ``max_prefill_padding`` 0.05)
and "padded" (one group left-padded to the longest prompt, the engine before issue #15). Printed: real
prompt tokens/s, and packed mixed / the best equal-length figure of any engine (target >= 0.95),
measured round by round in this run (rounds alternate their order against drift). With --ttft-long N:
the time until --prompts short prompts all have their first token, alone and when they join in the
same step as one N-token prompt, with the long prompt prefilled whole (``prefill_chunk=None``: the short
requests wait for its prefill) and in chunks of --chunk tokens; and the stall of running rows: --prompts
short requests are decoding when the N-token prompt arrives, and the longest gap between two of their
tokens is printed against their median gap, whole and chunked.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
import time

import torch
from bench_common import load_model, parser, set_threads

from prefixtune.serving.engine import Engine, EngineConfig
from prefixtune.serving.sampling import SamplingParams


def running_rows_stall(model: torch.nn.Module, config: EngineConfig, short: list[list[int]], long: list[int],
                       steps: int = 6) -> dict[str, float]:
    """``short`` requests decode for ``steps`` steps, then ``long`` arrives; the longest gap between two
    consecutive tokens of the short requests (s), their median gap, and the ratio."""
    engine = Engine(model, config)
    new = steps + (len(long) + (config.prefill_chunk or len(long)) - 1) // (config.prefill_chunk or len(long)) + 4
    gens = [engine.submit(p, SamplingParams(max_new_tokens=new, ignore_eos=True)) for p in short]
    times: list[float] = []
    for i in itertools.count():
        if i == steps:
            engine.submit(long, SamplingParams(max_new_tokens=1, ignore_eos=True))
        if not engine.step() or all(gen.done for gen in gens):
            break
        times.append(time.perf_counter())
    gaps = [b - t for t, b in itertools.pairwise(times)]
    longest, median = max(gaps), statistics.median(gaps)
    return {"longest_s": round(longest, 4), "median_s": round(median, 4), "ratio": round(longest / median, 1)}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ttft-long", type=int, default=0,
                    help="also: time to first token of --prompts short prompts (--min-len) joining with one "
                         "prompt of this many tokens, against the short ones alone (0: not measured)")
    ap.add_argument("--chunk", type=int, default=64, help="prefill_chunk of the chunked engine (--ttft-long)")
    ap.add_argument("--engines", nargs="+", default=["packed", "grouped", "padded"],
                    choices=["packed", "grouped", "padded"], help="which engines to run (packed is always run)")
    a = ap.parse_args()
    set_threads(a.threads)
    model = load_model(a.model, min_positions=max(a.max_len, a.ttft_long) + 2)
    g = torch.Generator().manual_seed(a.seed)
    vocab = model.config.vocab_size
    lengths = torch.randint(a.min_len, a.max_len + 1, (a.prompts,), generator=g).tolist()
    mean = round(sum(lengths) / len(lengths))
    work = {"mixed": [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths],
            "equal": [torch.randint(3, vocab, (mean,), generator=g).tolist() for _ in lengths]}
    engines = {"packed": EngineConfig(max_batch_size=a.prompts, max_prefill_batch=a.prompts),
               "grouped": EngineConfig(max_batch_size=a.prompts, max_prefill_batch=a.prompts, prefill="grouped"),
               "padded": EngineConfig(max_batch_size=a.prompts, max_prefill_batch=a.prompts, prefill="grouped",
                                      max_prefill_padding=1e9)}
    engines = {k: v for k, v in engines.items() if k == "packed" or k in a.engines}
    params = SamplingParams(max_new_tokens=1, ignore_eos=True)

    def run(engine_name: str, kind: str) -> float:
        engine = Engine(model, engines[engine_name])
        assert (engine.packing_refused is None) == (engine_name == "packed"), engine.packing_refused
        prompts = work[kind]
        start = time.perf_counter()
        out = engine.generate(prompts, params)
        elapsed = time.perf_counter() - start
        assert all(len(o) == 1 for o in out)
        return sum(map(len, prompts)) / elapsed

    run("packed", "equal")  # warm-up
    rates: dict[tuple[str, str], list[float]] = {(e, k): [] for e in engines for k in work}
    for r in range(a.rounds):
        order = list(rates) if r % 2 == 0 else list(reversed(rates))
        for key in order:
            rates[key].append(run(*key))
        print(f"round {r + 1}: " + ", ".join(f"{e}/{k} {v[-1]:.0f} tok/s" for (e, k), v in rates.items()), flush=True)
    med = {key: statistics.median(v) for key, v in rates.items()}
    best_equal = max(v for (_, k), v in med.items() if k == "equal")
    ttft, stall = {}, {}
    if a.ttft_long:
        short = [torch.randint(3, vocab, (a.min_len,), generator=g).tolist() for _ in range(a.prompts)]
        long = torch.randint(3, vocab, (a.ttft_long,), generator=g).tolist()
        chunking = {"whole": dataclasses.replace(engines["packed"], prefill_chunk=None),
                    f"chunks of {a.chunk}": dataclasses.replace(engines["packed"], prefill_chunk=a.chunk)}
        for label, prompts, config in (("short alone", short, chunking["whole"]),
                                       *((f"short with a long prompt, {k}", [long, *short], c)
                                         for k, c in chunking.items())):
            engine = Engine(model, dataclasses.replace(config, max_batch_size=a.prompts + 1))
            start = time.perf_counter()
            gens = [engine.submit(p, params) for p in prompts]
            while not all(gen.done for gen in gens[-len(short):]):
                engine.step()
            ttft[label] = round(time.perf_counter() - start, 3)  # every short request has its first token
        for label, config in chunking.items():
            stall[label] = running_rows_stall(model, dataclasses.replace(config, max_batch_size=a.prompts + 1),
                                              short, long)
    print(json.dumps({
        "setup": {"model": a.model, "prompts": a.prompts, "lengths": f"{a.min_len}-{a.max_len}",
                  "mixed_total": sum(lengths), "longest": max(lengths), "equal_length": mean, "rounds": a.rounds,
                  "threads": torch.get_num_threads()},
        "prompt_tokens_per_s_median": {f"{e}/{k}": round(v, 1) for (e, k), v in med.items()},
        "packed mixed / best equal (target >= 0.95)": round(med[("packed", "mixed")] / best_equal, 3),
        **{f"{e}: mixed / equal": round(med[(e, "mixed")] / med[(e, "equal")], 3) for e in engines},
        **({"packed mixed / padded mixed (gain)": round(med[("packed", "mixed")] / med[("padded", "mixed")], 2)}
           if "padded" in engines else {}),
        **({f"time to first token of {a.prompts} x {a.min_len}-token prompts (s), packed; long prompt "
            f"{a.ttft_long} tokens": ttft,
            f"running rows' longest gap between tokens / their median gap, when a {a.ttft_long}-token prompt "
            f"arrives": stall} if ttft else {}),
    }, indent=2))


if __name__ == "__main__":
    main()
