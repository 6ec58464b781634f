"""The prefix-tuning paper's findings (Li & Liang, 2021) on E2E with SmolLM2-135M: one resumable runner.

    python experiments/paper_findings.py [--experiments lr,length,embedding,infix,reparam,init,baselines]
                                         [--seeds 1,2] [--root runs/findings] [--no-run] [--worker K/N]

Sizes, chosen for a 2-core CPU (a run is about 5 minutes there): every row trains for the same budget of
75 optimizer steps of batch 8 (600 example-passes, i.e. 3 epochs of the 200-example default subset),
AdamW, 10 warm-up steps, linear decay, then decodes the first 100 test MRs greedily. The training subset
is a seeded shuffle of E2E train (the seed is the run's seed). Runs go seed-major (every experiment with
the first seed before any with the second), so a partial grid is already a complete picture.

Experiments (each row's spec is in the CSV):
  lr         learning rate per parameterization, chosen by BLEU on the first 100 dev MRs (seed 1):
             MLP (h = 512) from LR_MLP, flat table (P-tuning v2) from LR_FLAT; P = 10, random init
  length     P in 1, 5, 10, 20, 40, 80 (MLP, random init)
  embedding  embedding-only (P virtual input embeddings) vs the full prefix, P in 1, 10, 20
  infix      [x; INFIX; y] vs the prefix, P in 1, 10, 20
  reparam    MLP vs flat table, P = 10, each at its own chosen rate
  init       random vs "table-to-text:" vs unrelated words, P = 6, at 50 and 500 training examples
  baselines  full fine-tuning and PEFT's prefix tuning (P = 10, projection h = 512), 200 examples

Each run's result is kept under --root/<key>/result.json (see table2text_runs.py); the raw rows go to
docs/results/paper_findings.csv; ``plot_findings.py`` makes the plots and docs/experiments.md from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

from table2text_runs import RunSpec, csv_row, run, write_csv

BASE = RunSpec(prefix_length=10, reparam=True, reparam_hidden=512, train_limit=200, epochs=1000, max_steps=75,
               batch_size=8, warmup_steps=10, test_limit=100, dev_limit=0)
LR_MLP = [5e-4, 2e-3, 5e-3]
LR_FLAT = [5e-3, 2e-2, 5e-2, 1e-1]  # 1e-1 added once 5e-2 won: a best rate at the grid's edge is no choice
LR_FINETUNE = 5e-5  # the rate quality_e2e.py uses for full fine-tuning of this model
TASK_WORDS = "table-to-text:"  # 6 SmolLM2 tokens
UNRELATED_WORDS = "elephant divide banana purple:"  # 6 tokens too, nothing to do with the task
EXPERIMENTS = ["lr", "length", "embedding", "infix", "reparam", "init", "baselines"]


def lr_candidates(flat: bool, seed: int) -> list[RunSpec]:
    rates = LR_FLAT if flat else LR_MLP
    return [dataclasses.replace(BASE, reparam=not flat, lr=lr, seed=seed, dev_limit=100) for lr in rates]


def chosen_lr(flat: bool, results: dict[str, dict]) -> float | None:
    """The candidate rate with the best dev BLEU (seed-1 sweep), or None while the sweep is unfinished."""
    found = [results.get(spec.key) for spec in lr_candidates(flat, 1)]
    if not all(found):
        return None
    best = max(found, key=lambda r: r["dev"]["BLEU"])
    return best["spec"]["lr"]


def specs(experiment: str, seed: int, lr_mlp: float, lr_flat: float | None) -> list[RunSpec]:
    """The runs of one experiment at one seed (dev decoding is off: these are test-only comparisons)."""
    base = dataclasses.replace(BASE, lr=lr_mlp, seed=seed)
    if experiment == "lr":
        return lr_candidates(False, seed) + lr_candidates(True, seed) if seed == 1 else []
    if experiment == "length":
        return [dataclasses.replace(base, prefix_length=p) for p in (1, 5, 10, 20, 40, 80)]
    if experiment in ("embedding", "infix"):
        mode = "embedding-only" if experiment == "embedding" else "infix"
        return [dataclasses.replace(base, prefix_length=p, mode=m) for p in (1, 10, 20) for m in ("prefix", mode)]
    if experiment == "reparam":
        return [base] + ([dataclasses.replace(base, reparam=False, lr=lr_flat)] if lr_flat else [])
    if experiment == "init":
        return [dataclasses.replace(base, prefix_length=6, init=init, train_limit=n)
                for n in (50, 500) for init in ("random", f"text:{TASK_WORDS}", f"text:{UNRELATED_WORDS}")]
    if experiment == "baselines":
        return [base, dataclasses.replace(base, system="peft"),
                dataclasses.replace(base, system="finetune", lr=LR_FINETUNE)]
    raise ValueError(f"unknown experiment {experiment!r}; choose from {EXPERIMENTS}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS))
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--root", default="runs/findings")
    ap.add_argument("--csv", default="docs/results/paper_findings.csv")
    ap.add_argument("--no-run", action="store_true", help="only collect the runs already done into the CSV")
    ap.add_argument("--worker", default="0/1", metavar="K/N",
                    help="run only the runs assigned to worker K of N (start N processes to share the grid)")
    args = ap.parse_args()
    worker, workers = (int(x) for x in args.worker.split("/"))
    root = Path(args.root)
    experiments = args.experiments.split(",")
    done: dict[str, dict] = {}

    def finished(spec: RunSpec) -> dict | None:
        """The run's result if it is done (perhaps by another worker since this one started)."""
        path = root / spec.key / "result.json"
        if spec.key not in done and path.is_file():
            done[spec.key] = json.loads(path.read_text())
        return done.get(spec.key)

    def get(spec: RunSpec) -> dict | None:
        # the same run decoded on dev too (the learning-rate sweep) serves as the run without dev
        result = finished(dataclasses.replace(spec, dev_limit=100)) or finished(spec)
        mine = int(hashlib.sha256(spec.key.encode()).hexdigest(), 16) % workers == worker
        if result is None and mine and not args.no_run:
            print(f"=== {spec.key}", flush=True)
            result = done[spec.key] = run(spec, root)
        return result

    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        sweep = specs("lr", 1, 0, None)
        for spec in sweep:
            get(spec)
        while workers > 1 and not args.no_run and not all(finished(spec) for spec in sweep):
            time.sleep(30)  # another worker is still on its part of the sweep
        if seed == 1 and "lr" in experiments:  # the sweep's rows, also while it is unfinished
            rows += [csv_row("lr", r) for r in (finished(spec) for spec in sweep) if r]
        lr_mlp, lr_flat = chosen_lr(False, done), chosen_lr(True, done)
        if lr_mlp is None:
            print("the learning-rate sweep is unfinished; nothing else can run yet")
            break
        for experiment in (e for e in experiments if e != "lr"):
            for spec in specs(experiment, seed, lr_mlp, lr_flat):
                result = get(spec)
                if result:
                    rows.append(csv_row(experiment, result))
    write_csv(rows, args.csv)
    print(f"{len(rows)} rows -> {args.csv}")


if __name__ == "__main__":
    main()
