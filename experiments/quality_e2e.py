"""Low-data E2E quality bar: prefixtune vs PEFT prefix tuning vs full fine-tuning, same data and budget.

    python experiments/quality_e2e.py [--out runs/quality] [--systems prefixtune,prefixtune-random,peft,finetune]

Every system trains SmolLM2-135M-Instruct on the same 500 E2E training examples (seeded shuffle), 3 epochs,
batch 16 (94 optimizer steps), AdamW with 10 warm-up steps and linear decay, then decodes the first 100 test
MRs greedily (48 new tokens at most) and is scored with the E2E metrics. Prefix systems: P = 10, reparameterized
with h = 512. Each system's result is saved under --out/<system>/result.json and reused on the next run, so
the script resumes where it stopped. The table goes to docs/quality_e2e.md.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from prefixtune import PrefixConfig  # noqa: E402
from prefixtune.data import collate  # noqa: E402
from prefixtune.decode import generate_texts  # noqa: E402
from prefixtune.fileio import atomic_write_text  # noqa: E402
from prefixtune.hub import load_causal_lm  # noqa: E402
from prefixtune.interop import import_peft  # noqa: E402
from prefixtune.pipeline import DataSpec, load_trained, metrics_for, prepare_data, reference_groups, train_run  # noqa: E402
from prefixtune.train import TrainConfig, fit  # noqa: E402

MODEL = "smollm2-135m"
INIT_TEXT = "table-to-text: describe the restaurant:"  # 10 SmolLM2 tokens, so P = 10 as for the others


def right_pad(batch, pad_id):
    return collate(batch, pad_id, padding_side="right")


def evaluate(model, tokenizer, data: DataSpec, eval_limit: int) -> dict:
    sources, refs = reference_groups("e2e", "test", eval_limit)
    preds = generate_texts(model, tokenizer, sources, data.format, batch_size=20, max_new_tokens=48)
    return {"metrics": metrics_for("e2e", preds, refs), "example": {"source": sources[0], "output": preds[0]}}


def run_system(name: str, out: Path, data: DataSpec, train: TrainConfig, args) -> dict:
    t0 = time.perf_counter()
    if name.startswith("prefixtune"):
        init = "random" if name == "prefixtune-random" else f"text:{INIT_TEXT}"
        prefix = PrefixConfig(prefix_length=10, reparam=True, reparam_hidden=512, init=init)
        summary = train_run(out, MODEL, data, prefix, train, resume=True)
        model, tokenizer, _ = load_trained(out)
        result = {"trainable_parameters": summary["trainable_parameters"], "steps": summary["steps"]}
        result.update(evaluate(model, tokenizer, data, args.eval_limit))
    else:
        model, tokenizer = load_causal_lm(MODEL)
        _, encoded, dev = prepare_data(tokenizer, data, train.seed)
        torch.manual_seed(train.seed)
        if name == "peft":
            import peft

            cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10, prefix_projection=True,
                                          encoder_hidden_size=512)
            model = peft.get_peft_model(model, cfg)
        elif name != "finetune":
            raise ValueError(f"unknown system {name!r}")
        cfg = train if name == "peft" else TrainConfig(**{**train.__dict__, "lr": args.lr_finetune,
                                                          "checkpoint_every": 1000})
        state = fit(model, encoded, out, cfg, tokenizer.pad_token_id, dev=dev, resume=True, collate_fn=right_pad)
        result = {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "steps": state.step}
        result.update(evaluate(model, tokenizer, data, args.eval_limit))
        if name == "peft":  # the same trained prefix, decoded through prefixtune
            model.save_pretrained(str(out / "adapter"))
            ours = import_peft(out / "adapter", load_causal_lm(MODEL)[0])
            result["through_prefixtune_generate"] = evaluate(ours, tokenizer, data, args.eval_limit)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["lr"] = args.lr_finetune if name == "finetune" else train.lr
    return result


def write_table(results: dict[str, dict], path: Path, args) -> str:
    keys = ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    lines = [
        "# Low-data E2E: prefixtune vs PEFT vs full fine-tuning",
        "",
        f"SmolLM2-135M-Instruct, {args.train_limit} E2E training examples (seeded shuffle, seed {args.seed}), "
        f"{args.epochs:g} epochs, batch {args.batch_size}, greedy decoding of the first {args.eval_limit} test MRs, "
        "on a 2-core CPU. Produced by:",
        "",
        "    python experiments/quality_e2e.py",
        "",
        "| system | trainable params | lr | " + " | ".join(keys) + " | wall s |",
        "|---|---:|---:|" + "---:|" * len(keys) + "---:|",
    ]
    labels = {"prefixtune": f"prefixtune (P=10, MLP h=512, init \"{INIT_TEXT}\")",
              "prefixtune-random": "prefixtune (P=10, MLP h=512, random init)",
              "peft": "PEFT prefix tuning (P=10, projection h=512), PEFT's generate",
              "finetune": "full fine-tuning"}
    for name, r in results.items():
        m = r["metrics"]
        lines.append(f"| {labels.get(name, name)} | {r['trainable_parameters']:,} | {r['lr']:g} | "
                     + " | ".join(f"{m[k]:.4f}" for k in keys) + f" | {r['wall_s']:.0f} |")
        if "through_prefixtune_generate" in r:
            m2 = r["through_prefixtune_generate"]["metrics"]
            lines.append("| PEFT's trained prefix, decoded by prefixtune | | | "
                         + " | ".join(f"{m2[k]:.4f}" for k in keys) + " | |")
    lines += ["", "Example (first test MR):", ""]
    for name, r in results.items():
        lines.append(f"- {labels.get(name, name)}: {r['example']['output']}")
    text = "\n".join(lines) + "\n"
    atomic_write_text(path, text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--systems", default="prefixtune,prefixtune-random,peft,finetune")
    ap.add_argument("--train-limit", type=int, default=500)
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--lr", type=float, default=5e-4, help="prefix systems (prefixtune and PEFT)")
    ap.add_argument("--lr-finetune", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--table", default="docs/quality_e2e.md")
    args = ap.parse_args()
    data = DataSpec(train_limit=args.train_limit, dev_limit=100)
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_steps=10, seed=args.seed,
                        eval_every=None, log_every=5)
    results = {}
    for name in args.systems.split(","):
        out = Path(args.out) / name
        result_path = out / "result.json"
        if result_path.is_file():
            results[name] = json.loads(result_path.read_text())
            continue
        print(f"=== {name}")
        results[name] = run_system(name, out, data, train, args)
        atomic_write_text(result_path, json.dumps(results[name], indent=2) + "\n")
        print(json.dumps(results[name]["metrics"]))
    print(write_table(results, Path(args.table), args))


if __name__ == "__main__":
    main()
