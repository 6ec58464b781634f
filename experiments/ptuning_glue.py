"""P-tuning v2 on a real encoder: all-MiniLM-L6-v2 on SST-2 and RTE, against a linear probe, full
fine-tuning and PEFT's prefix tuning, with the same data and steps, over several seeds.

    python experiments/ptuning_glue.py [--tasks sst2,rte] [--seeds 1,2] [--out runs/glue]

Sizes (for a 2-core CPU): SST-2 trains on 4,000 examples (seeded subset of 67,349), RTE on all 2,490;
3 epochs each, batch 32 (SST-2) / 16 (RTE), inputs cut at 128 tokens; accuracy on the full dev sets
(872 / 277). Each run's result is kept under --out/<task>/<system>-s<seed>/result.json and reused, so the
script resumes. The table goes to docs/ptuning_glue.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from prefixtune import PrefixConfig  # noqa: E402
from prefixtune.classify import classification_metrics, collate_classes, encode_examples, predict  # noqa: E402
from prefixtune.data import shuffled_subset  # noqa: E402
from prefixtune.fileio import atomic_write_text  # noqa: E402
from prefixtune.pipeline import ClassifySpec, load_classifier_base, train_classifier_run  # noqa: E402
from prefixtune.train import TrainConfig, fit  # noqa: E402

MODEL = "minilm-l6"
SIZES = {"sst2": {"train_limit": 4000, "batch": 32}, "rte": {"train_limit": None, "batch": 16}}
SYSTEMS = {
    # name: (label, learning rate)
    "ptuning-v2": ("P-tuning v2 (prefix P=16 at every layer + head), prefix init N(0, 0.02)", 1e-2),
    "ptuning-v2-init1": ("P-tuning v2, prefix init N(0, 1) (as PEFT and the P-tuning v2 code)", 1e-2),
    "head-only": ("linear probe (head only, frozen encoder)", 1e-2),
    "finetune": ("full fine-tuning", 5e-5),
    "peft-prefix": ("PEFT prefix tuning (P=16, SEQ_CLS)", 1e-2),
}


def run(task: str, system: str, seed: int, out: Path, epochs: float) -> dict:
    size = SIZES[task]
    spec = ClassifySpec(data=task, train_limit=size["train_limit"], max_length=128)
    lr = SYSTEMS[system][1]
    train = TrainConfig(epochs=epochs, batch_size=size["batch"], lr=lr, warmup_steps=20, seed=seed, log_every=20,
                        checkpoint_every=10_000)
    t0 = time.perf_counter()
    if system in ("ptuning-v2", "ptuning-v2-init1", "head-only"):
        prefix = PrefixConfig(prefix_length=0 if system == "head-only" else 16, reparam=False,
                              init_std=1.0 if system == "ptuning-v2-init1" else 0.02)
        summary = train_classifier_run(out, MODEL, spec, prefix, train, resume=True, progress=False)
        return {"dev": summary["dev"], "trainable_parameters": summary["trainable_parameters"],
                "wall_s": round(time.perf_counter() - t0, 1), "lr": lr}
    examples, labels = spec.load("train")
    if spec.train_limit:
        examples = shuffled_subset(examples, spec.train_limit, seed)
    dev_examples, _ = spec.load("dev", labels)
    torch.manual_seed(seed)
    model, tokenizer = load_classifier_base(MODEL, len(labels))
    if system == "peft-prefix":
        import peft

        model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=16))
    prompt_before = {n: p.detach().clone() for n, p in model.named_parameters() if "prompt_encoder" in n}
    encoded = encode_examples(tokenizer, examples, spec.max_length)
    dev = encode_examples(tokenizer, dev_examples, spec.max_length)
    fit(model, encoded, out, train, tokenizer.pad_token_id or 0, resume=True, progress=False,
        collate_fn=collate_classes)
    preds = predict(model, dev, tokenizer.pad_token_id or 0)
    extra = {}
    if prompt_before:  # did PEFT's prefix reach the model at all (a prefix the model ignores gets no gradient)?
        params = dict(model.named_parameters())
        extra["prefix_trained"] = any(not torch.equal(v, params[n]) for n, v in prompt_before.items())
    return {"dev": classification_metrics(preds, [d.label for d in dev]), "lr": lr, **extra,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "wall_s": round(time.perf_counter() - t0, 1)}


def encoder_parameters() -> int:
    model, _ = load_classifier_base(MODEL, 2)
    return sum(p.numel() for p in model.base_model.parameters())


def table(results: dict, seeds: list[int], epochs: float) -> str:
    total = encoder_parameters()
    lines = ["# P-tuning v2 on all-MiniLM-L6-v2: SST-2 and RTE", "",
             f"Frozen all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden, {total / 1e6:.1f}M parameters). SST-2: "
             f"{SIZES['sst2']['train_limit']:,} training examples (seeded subset), batch {SIZES['sst2']['batch']}; "
             f"RTE: all 2,490, batch {SIZES['rte']['batch']}; {epochs:g} epochs, AdamW, 20 warm-up steps, linear "
             f"decay; dev accuracy (SST-2 872, RTE 277 examples), mean ± std over seeds {seeds}. 2-core CPU. "
             "Produced by:", "", "    python experiments/ptuning_glue.py", "",
             "| task | system | lr | trainable params | % of encoder | dev accuracy | per seed | macro F1 | MCC |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for task, by_system in results.items():
        for system, runs in by_system.items():
            label = SYSTEMS[system][0]
            if "error" in runs:
                lines.append(f"| {task} | {label} | | | | fails: {runs['error']} | | | |")
                continue
            accs = [r["dev"]["accuracy"] for r in runs.values()]
            f1 = statistics.mean(r["dev"]["macro_f1"] for r in runs.values())
            mcc = statistics.mean(r["dev"]["mcc"] for r in runs.values())
            params = next(iter(runs.values()))["trainable_parameters"]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"| {task} | {label} | {next(iter(runs.values()))['lr']:g} | {params:,} | "
                         f"{100 * params / total:.2f} | {100 * statistics.mean(accs):.1f} ± {100 * std:.1f} | "
                         f"{', '.join(f'{100 * a:.1f}' for a in accs)} | {f1:.3f} | {mcc:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="sst2,rte")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--out", default="runs/glue")
    ap.add_argument("--table", default="docs/ptuning_glue.md")
    ap.add_argument("--no-run", action="store_true", help="only tabulate the runs already done")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict = {}
    for task in args.tasks.split(","):
        for system in args.systems.split(","):
            results.setdefault(task, {})[system] = {}
            for seed in seeds:
                out = Path(args.out) / task / f"{system}-s{seed}"
                path = out / "result.json"
                if path.is_file():
                    result = json.loads(path.read_text())
                elif args.no_run:
                    continue
                else:
                    print(f"=== {task} {system} seed {seed}", flush=True)
                    try:
                        result = run(task, system, seed, out, args.epochs)
                    except Exception as exc:  # a baseline that cannot run is reported, not hidden
                        traceback.print_exc()
                        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
                    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
                    print(json.dumps(result), flush=True)
                if "error" in result:
                    results[task][system] = {"error": result["error"]}
                    break
                results[task][system][seed] = result
    results = {t: {s: r for s, r in by.items() if r} for t, by in results.items()}
    results = {t: by for t, by in results.items() if by}
    text = table(results, seeds, args.epochs)
    atomic_write_text(Path(args.table), text)
    print(text)


if __name__ == "__main__":
    main()
