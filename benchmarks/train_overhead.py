"""Training-step overhead of prefixtune against the floor and PEFT, on the real SmolLM2-135M (CPU).

    python benchmarks/train_overhead.py [--batch 8 --seq 128 --prefix 10 --steps 8]

Measured in one run, interleaved round by round (median and min over rounds):
- floor: the frozen model's forward + backward with gradients only to the input embeddings
  (the least work any method that trains something in front of the model must do);
- prefixtune: forward + backward + AdamW step of a reparameterized prefix (h = 512);
- PEFT: the same with PEFT's prefix tuning (prefix_projection, encoder_hidden_size = 512).
Peak memory is each variant's peak RSS during a training step above the RSS just before it
(sampled every millisecond), each in a fresh subprocess (with and without gradient
checkpointing for prefixtune).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from prefixtune import PrefixConfig, attach  # noqa: E402
from prefixtune.io.hub import DEFAULT_MODEL, load_causal_lm  # noqa: E402


def make_batch(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(10, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def build(variant: str, prefix: int, checkpointing: bool):
    """Returns a function doing one training step of ``variant``."""
    model, _ = load_causal_lm(DEFAULT_MODEL)
    model.train()
    if variant == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()

        def step(ids):
            embeds = emb(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, labels=ids).loss
            loss.backward()
            return loss

        return step
    if variant == "prefixtune":
        pm = attach(model, PrefixConfig(prefix_length=prefix, reparam=True, reparam_hidden=512))
        if checkpointing:
            pm.gradient_checkpointing_enable()
        pm.train()
        params = [p for p in pm.parameters() if p.requires_grad]
        forward = pm
    elif variant == "peft":
        import peft

        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix, prefix_projection=True,
                                      encoder_hidden_size=512)
        forward = peft.get_peft_model(model, cfg)
        forward.train()
        params = [p for p in forward.parameters() if p.requires_grad]
    else:
        raise ValueError(variant)
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(ids):
        loss = forward(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(variant: str, args) -> None:
    """Runs in a subprocess: prints the peak RSS during a training step above the RSS before it, in MB.

    A thread samples RSS every millisecond (ru_maxrss would include the loading peak).
    """
    step = build(variant, args.prefix, args.checkpointing)
    ids = make_batch(49152, args.batch, args.seq)
    step(ids)  # warm-up: optimizer state and allocator caches exist from now on
    base = rss_mb()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step(ids)
    done.set()
    sampler.join()
    print(json.dumps({"variant": variant, "checkpointing": args.checkpointing, "peak_above_load_mb": peak[0] - base}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prefix", type=int, default=10)
    ap.add_argument("--steps", type=int, default=8, help="measured rounds (after one warm-up round)")
    ap.add_argument("--child", choices=["floor", "prefixtune", "peft"])
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args)
        return

    torch.manual_seed(0)
    variants = ["floor", "prefixtune", "peft"]
    steps = {v: build(v, args.prefix, False) for v in variants}
    ids = make_batch(49152, args.batch, args.seq)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rnd in range(args.steps + 1):
        for v in variants[rnd % 3:] + variants[: rnd % 3]:  # rotate the order: no variant always runs first
            t0 = time.perf_counter()
            steps[v](ids)
            if rnd:
                times[v].append(time.perf_counter() - t0)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    best = {v: min(ts) for v, ts in times.items()}
    print(f"SmolLM2-135M, CPU x{torch.get_num_threads()} threads, batch {args.batch} x {args.seq} tokens, "
          f"P = {args.prefix}, {args.steps} rounds (order rotated each round)")
    for v in variants:
        print(f"  {v:11s} median {med[v]:6.3f} s/step  min {best[v]:6.3f}  ({', '.join(f'{t:.2f}' for t in times[v])})")
    for stat, d in (("median", med), ("min", best)):
        print(f"  {stat:6s}: prefixtune / floor = {d['prefixtune'] / d['floor']:.3f} (target <= 1.05), "
              f"prefixtune / PEFT = {d['prefixtune'] / d['peft']:.3f} (target <= 1.00)")
    if args.skip_memory:
        return
    del steps
    print("peak memory during a step, above the memory before it (fresh process each):")
    for v, ckpt in [("floor", False), ("prefixtune", False), ("prefixtune", True), ("peft", False)]:
        cmd = [sys.executable, __file__, "--child", v, "--batch", str(args.batch), "--seq", str(args.seq),
               "--prefix", str(args.prefix)] + (["--checkpointing"] if ckpt else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rec = json.loads(out)
        label = v + (" + gradient checkpointing" if ckpt else "")
        print(f"  {label:37s} {rec['peak_above_load_mb']:8.0f} MB")


if __name__ == "__main__":
    main()
