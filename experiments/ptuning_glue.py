"""P-tuning v2 on a real encoder: all-MiniLM-L6-v2 on SST-2 and RTE, against linear probes, full
fine-tuning and PEFT's prefix tuning, with the same training examples, over several seeds.

    python experiments/ptuning_glue.py [--tasks sst2,rte] [--out runs/glue] [--no-run]

Sizes (for a 2-core CPU): SST-2 trains on 4,000 examples (seeded subset of 67,349), RTE on all 2,490;
3 epochs (SST-2 rows may say 6: fine-tuning runs at both budgets), batch 32 (SST-2) / 16 (RTE), inputs
cut at 128 tokens; accuracy on the full dev sets (872 / 277). P-tuning v2's settings (CANDIDATES) are
chosen by accuracy on 1,000 held-out SST-2 training examples, never on dev. Each run's result is kept
under --out/<task>/<system>-s<seed>/result.json and, one row per run, in --record
(docs/results/ptuning_glue_runs.csv, committed); both are reused, so the script resumes and the table
(docs/ptuning_glue.md) can be rebuilt from the record alone (--no-run). Rows whose ``source`` is not "run"
were carried over from an earlier table (see that column).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from prefixtune import PrefixConfig  # noqa: E402
from prefixtune.files import atomic_write_text  # noqa: E402
from prefixtune.tasks.classification import (  # noqa: E402
    ClassificationTask,
    ClassifySpec,
    classification_metrics,
    collate_classes,
    encode_examples,
    load_classifier_base,
    predict,
)
from prefixtune.tasks.readers import shuffled_subset  # noqa: E402
from prefixtune.training.loop import TrainConfig, fit  # noqa: E402
from prefixtune.training.pipeline import load_trained, train_run  # noqa: E402

MODEL = "minilm-l6"
# max_epochs: the longest budget a system may have on the task (an RTE epoch costs ~3 SST-2 epochs on the CPU)
SIZES = {"sst2": {"train_limit": 4000, "batch": 32, "seeds": [1, 2, 3], "max_epochs": 6},
         "rte": {"train_limit": None, "batch": 16, "seeds": [1, 2], "max_epochs": 3}}
VAL_SIZE = 1000  # SST-2 training examples outside the run's subset, for choosing settings (never dev)
POOLER_HEAD = ("bert.pooler", "classifier")  # BERT's dense+tanh pooler trained as part of the head


@dataclass(frozen=True)
class System:
    label: str
    kind: str  # "ptuning" (prefix + head, or head only with P = 0) | "finetune" | "peft"
    lr: float
    prefix_length: int = 16
    init_std: float = 0.02
    head: tuple[str, ...] | None = None  # None: the library's default head for the architecture
    pooling: str | None = None  # the head type (ClassifySpec.pooling: cls | mean); None: ClassifySpec's default
    batch: int | None = None  # None: the task's batch size (SIZES); same epochs, so more, smaller steps
    epochs: float | None = None  # None: --epochs


SYSTEMS = {
    "ptuning-v2": System("P-tuning v2 (P=16 at every layer + classifier), init N(0, 0.02)", "ptuning", 1e-2),
    "ptuning-v2-init1": System("P-tuning v2, init N(0, 1) (as PEFT and the P-tuning v2 code)", "ptuning", 1e-2,
                               init_std=1.0),
    "ptuning-v2-init1-lr3e-2": System("P-tuning v2, init N(0, 1), lr 3e-2", "ptuning", 3e-2, init_std=1.0),
    "ptuning-v2-init1-P64": System("P-tuning v2, init N(0, 1), P=64", "ptuning", 1e-2, prefix_length=64,
                                   init_std=1.0),
    "ptuning-v2-pooler": System("P-tuning v2, init N(0, 1), head = BERT pooler + classifier", "ptuning", 1e-2,
                                init_std=1.0, head=POOLER_HEAD),
    "ptuning-v2-init1-lr1e-1": System("P-tuning v2, init N(0, 1), lr 1e-1", "ptuning", 1e-1, init_std=1.0),
    "ptuning-v2-pooler-lr3e-2": System("P-tuning v2, init N(0, 1), lr 3e-2, head = BERT pooler + classifier",
                                       "ptuning", 3e-2, init_std=1.0, head=POOLER_HEAD),
    "ptuning-v2-init1-lr3e-2-b16": System("P-tuning v2, init N(0, 1), lr 3e-2, batch 16", "ptuning", 3e-2,
                                          init_std=1.0, batch=16),
    "ptuning-v2-init1-lr3e-2-6ep": System("P-tuning v2, init N(0, 1), lr 3e-2, 6 epochs", "ptuning", 3e-2,
                                          init_std=1.0, epochs=6),
    "ptuning-v2-mean-lr3e-2-6ep": System("P-tuning v2, init N(0, 1), lr 3e-2, 6 epochs, head = mean pooling + "
                                         "classifier", "ptuning", 3e-2, init_std=1.0, epochs=6, pooling="mean"),
    "ptuning-v2-mean-lr3e-2": System("P-tuning v2, init N(0, 1), lr 3e-2, head = mean pooling + classifier",
                                     "ptuning", 3e-2, init_std=1.0, pooling="mean"),
    "head-only": System("linear probe (classifier only, frozen encoder)", "ptuning", 1e-2, prefix_length=0),
    "head-only-mean": System("linear probe on the mean-pooled encoder output (classifier only)", "ptuning", 1e-2,
                             prefix_length=0, pooling="mean"),
    "finetune": System("full fine-tuning", "finetune", 5e-5),
    "finetune-6ep": System("full fine-tuning, 6 epochs", "finetune", 5e-5, epochs=6),
    "peft-prefix": System("PEFT prefix tuning (P=16, SEQ_CLS)", "peft", 1e-2),
}
# P-tuning v2's settings are chosen among these by SST-2 validation accuracy (seed 1); the rest are baselines.
CANDIDATES = ["ptuning-v2", "ptuning-v2-init1", "ptuning-v2-init1-lr3e-2", "ptuning-v2-init1-P64",
              "ptuning-v2-pooler", "ptuning-v2-init1-lr1e-1", "ptuning-v2-pooler-lr3e-2",
              "ptuning-v2-init1-lr3e-2-b16", "ptuning-v2-init1-lr3e-2-6ep", "ptuning-v2-mean-lr3e-2"]
# (the 6-epoch mean-pooling candidate, "ptuning-v2-mean-lr3e-2-6ep", did not fit the CPU budget of its session)
# Fine-tuning runs at both budgets that P-tuning v2 may get, and the summary compares with the better one.
BASELINES = ["head-only", "head-only-mean", "finetune", "finetune-6ep", "peft-prefix"]
RECORD_FIELDS = ["task", "system", "seed", "lr", "epochs", "trainable_parameters", "dev_accuracy", "dev_macro_f1",
                 "dev_mcc", "val_accuracy", "val_macro_f1", "val_mcc", "wall_s", "error", "source"]
METRICS = ("accuracy", "macro_f1", "mcc")


def pooling_of(name: str) -> str:
    return SYSTEMS[name].pooling or ClassifySpec.pooling


def epochs_of(name: str, default: float) -> float:
    return SYSTEMS[name].epochs or default


def fits(name: str, task: str, default_epochs: float) -> bool:
    """Whether system ``name``'s epoch budget is within what ``task`` allows (SIZES' max_epochs)."""
    return epochs_of(name, default_epochs) <= SIZES[task]["max_epochs"]


def choose(selection: dict, task: str, default_epochs: float, pooling: str | None = None) -> str | None:
    """The candidate with the best SST-2 validation accuracy among those within the task's epoch budget
    (and of head type ``pooling`` when given)."""
    allowed = {n: r for n, r in selection.items()
               if fits(n, task, default_epochs) and pooling in (None, pooling_of(n))}
    return max(allowed, key=lambda n: allowed[n]["val"]["accuracy"]) if allowed else None


def validation_examples(task: str, train_subset: list) -> list | None:
    """SST-2: VAL_SIZE training examples outside ``train_subset`` (fixed order); RTE: none (all train is used)."""
    if task != "sst2":
        return None
    examples = ClassificationTask(ClassifySpec(data=task)).read("train")
    used = {e.where for e in train_subset}
    return [e for e in shuffled_subset(examples, len(examples), 10_000) if e.where not in used][:VAL_SIZE]


def validation_metrics(model, tokenizer, task: str, train_subset: list) -> dict | None:
    """Accuracy, F1 and MCC on ``validation_examples`` (None where the task has none)."""
    val = validation_examples(task, train_subset)
    if not val:
        return None
    preds = predict(model, encode_examples(tokenizer, val, 128), tokenizer.pad_token_id or 0)
    return classification_metrics(preds, [e.label for e in val])


def run(task: str, name: str, seed: int, out: Path, epochs: float) -> dict:
    size, system = SIZES[task], SYSTEMS[name]
    spec = ClassifySpec(data=task, train_limit=size["train_limit"], max_length=128, pooling=pooling_of(name))
    train = TrainConfig(epochs=epochs_of(name, epochs), batch_size=system.batch or size["batch"], lr=system.lr,
                        warmup_steps=20, seed=seed, log_every=20, checkpoint_every=50)
    t0 = time.perf_counter()
    reader = ClassificationTask(spec)
    examples = reader.read("train")
    if spec.train_limit:
        examples = shuffled_subset(examples, spec.train_limit, seed)
    if system.kind == "ptuning":
        prefix = PrefixConfig(prefix_length=system.prefix_length, reparam=False, init_std=system.init_std)
        ptask = ClassificationTask(spec, head=system.head)  # None: the architecture's classifier
        summary = train_run(out, MODEL, ptask, prefix, train, resume=True, progress=False)
        model, tokenizer, _, _ = load_trained(out)
        result = {"dev": summary["dev"], "trainable_parameters": summary["trainable_parameters"]}
    else:
        dev_examples, labels = reader.read("dev"), reader.labels
        torch.manual_seed(seed)
        model, tokenizer = load_classifier_base(MODEL, len(labels))
        if system.kind == "peft":
            import peft

            model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=16))
        prompt_before = {n: p.detach().clone() for n, p in model.named_parameters() if "prompt_encoder" in n}
        encoded = encode_examples(tokenizer, examples, spec.max_length)
        dev = encode_examples(tokenizer, dev_examples, spec.max_length)
        fit(model, encoded, out, train, tokenizer.pad_token_id or 0, resume=True, progress=False,
            collate_fn=collate_classes)
        result = {"dev": classification_metrics(predict(model, dev, tokenizer.pad_token_id or 0),
                                                [d.label for d in dev]),
                  "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        if prompt_before:  # did PEFT's prefix reach the model at all (a prefix the model ignores gets no gradient)?
            params = dict(model.named_parameters())
            result["prefix_trained"] = any(not torch.equal(v, params[n]) for n, v in prompt_before.items())
        for state_file in out.glob("state-*.safetensors"):  # a full model's resume state is large; done with it
            state_file.unlink()
    val = validation_metrics(model, tokenizer, task, examples)
    if val:
        result["val"] = val
    result.update(lr=system.lr, wall_s=round(time.perf_counter() - t0, 1))
    return result


def encoder_parameters() -> int:
    model, _ = load_classifier_base(MODEL, 2)
    return sum(p.numel() for p in model.base_model.parameters())


def read_record(path: Path) -> dict[tuple[str, str, int], dict]:
    """The runs kept in the CSV record, as results keyed (task, system, seed); {} when there is none."""
    if not path.is_file():
        return {}
    out = {}
    for line, row in enumerate(csv.DictReader(io.StringIO(path.read_text())), start=2):
        try:
            key = (row["task"], row["system"], int(row["seed"]))
            if row["error"]:
                out[key] = {"error": row["error"], "source": row["source"]}
                continue
            result = {"dev": {m: float(row[f"dev_{m}"]) if row[f"dev_{m}"] else None for m in METRICS},
                      "trainable_parameters": int(row["trainable_parameters"]), "lr": float(row["lr"]),
                      "epochs": float(row["epochs"]),
                      "wall_s": float(row["wall_s"]) if row["wall_s"] else None, "source": row["source"]}
        except (KeyError, ValueError) as exc:
            raise SystemExit(f"{path}:{line}: bad record row ({type(exc).__name__}: {exc})") from None
        if row["val_accuracy"]:
            result["val"] = {m: float(row[f"val_{m}"]) if row[f"val_{m}"] else None for m in METRICS}
        out[key] = result
    return out


def write_record(path: Path, record: dict[tuple[str, str, int], dict]) -> None:
    """One CSV row per run (task, system, seed order), every metric at full precision."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, RECORD_FIELDS, lineterminator="\n")
    writer.writeheader()
    for (task, name, seed), r in sorted(record.items()):
        row = {"task": task, "system": name, "seed": seed, "epochs": r.get("epochs", ""), "error": r.get("error", ""),
               "source": r.get("source", "run")}
        if "error" not in r:
            row.update(lr=r["lr"], trainable_parameters=r["trainable_parameters"],
                       wall_s="" if r.get("wall_s") is None else r["wall_s"])
            for part in ("dev", "val"):
                for m in METRICS:
                    value = (r.get(part) or {}).get(m)
                    row[f"{part}_{m}"] = "" if value is None else value
        writer.writerow(row)
    atomic_write_text(path, buf.getvalue())


def get(task: str, name: str, seed: int, root: Path, epochs: float, no_run: bool, record: dict) -> dict | None:
    """The run's result (from --out, else the CSV record; run it unless ``no_run``), also put in ``record``;
    SST-2 P-tuning results get their validation accuracy."""
    result = _get(task, name, seed, root, epochs, no_run, record.get((task, name, seed)))
    if result is not None:
        if "error" not in result:
            result.setdefault("epochs", epochs_of(name, epochs))
        record[(task, name, seed)] = result
    return result


def _get(task: str, name: str, seed: int, root: Path, epochs: float, no_run: bool, recorded: dict | None
         ) -> dict | None:
    out = root / task / f"{name}-s{seed}"
    path = out / "result.json"
    if not path.is_file() and recorded is not None:
        return recorded
    if path.is_file():
        result = json.loads(path.read_text())
        if "val" not in result and "error" not in result and task == "sst2" and SYSTEMS[name].kind == "ptuning":
            # runs made before the validation slice existed: score their saved model on it now
            model, tokenizer, _, _ = load_trained(out)
            examples = ClassificationTask(ClassifySpec(data=task)).read("train")
            result["val"] = validation_metrics(model, tokenizer, task,
                                               shuffled_subset(examples, SIZES[task]["train_limit"], seed))
            atomic_write_text(path, json.dumps(result, indent=2) + "\n")
        return result
    if no_run:
        return None
    print(f"=== {task} {name} seed {seed}", flush=True)
    try:
        result = run(task, name, seed, out, epochs)
    except Exception as exc:  # a baseline that cannot run is reported, not hidden
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    return result


def pct(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f} (1 seed)"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(selection: dict, chosen: dict[str, str | None], results: dict, epochs: float,
          best_of: dict[str, str | None]) -> str:
    total = encoder_parameters()
    lines = ["# P-tuning v2 on all-MiniLM-L6-v2: SST-2 and RTE", "",
             f"Frozen all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden, {total / 1e6:.1f}M parameters). SST-2: "
             f"{SIZES['sst2']['train_limit']:,} training examples (seeded subset), batch {SIZES['sst2']['batch']}; "
             f"RTE: all 2,490, batch {SIZES['rte']['batch']}; {epochs:g} epochs unless a row says otherwise, AdamW, "
             "20 warm-up steps, linear decay; accuracy on the dev sets (SST-2 872, RTE 277 examples), mean ± std "
             f"over seeds {SIZES['sst2']['seeds']} (SST-2) and {SIZES['rte']['seeds']} (RTE). Every system sees the "
             "same training examples; fine-tuning runs at each epoch budget P-tuning v2 may get. 2-core CPU, one "
             "thread per run. Produced by:", "", "    OMP_NUM_THREADS=1 python experiments/ptuning_glue.py", "",
             "which keeps one row per run in docs/results/ptuning_glue_runs.csv (and rebuilds this page from it "
             "with --no-run).", "",
             "Two head types: *cls* is the architecture's own head (BERT: classifier on the pooler's tanh of the "
             "first token, [CLS]); *mean* (`--pooling mean`) is a linear classifier on the mean of the last hidden "
             "states over the real tokens, the pooling all-MiniLM-L6-v2 was trained with.", "",
             "P-tuning v2's settings are chosen before any dev figure is looked at: each candidate trains on SST-2 "
             f"with seed 1 and is scored on {VAL_SIZE:,} held-out SST-2 *training* examples (outside the run's "
             "subset); the best validation accuracy wins and is then run with every seed. RTE has no held-out data "
             "here, so it takes SST-2's choice among the candidates within its epoch budget "
             f"({SIZES['rte']['max_epochs']:g} epochs: an RTE epoch costs about three SST-2 epochs on this CPU). "
             "The best candidate of each head type is also run with every SST-2 seed.", "",
             "## Selection (SST-2, seed 1)", "",
             "| candidate | lr | epochs | trainable params | validation accuracy | dev accuracy |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in selection.items():
        tasks = [t for t, c in chosen.items() if c == name]
        mark = f" **(chosen for {', '.join(tasks)})**" if tasks else ""
        mark += "".join(f" (best {p} head)" for p, c in best_of.items() if c == name and not tasks)
        lines.append(f"| {SYSTEMS[name].label}{mark} | {r['lr']:g} | {epochs_of(name, epochs):g} | "
                     f"{r['trainable_parameters']:,} | {100 * r['val']['accuracy']:.1f} | "
                     f"{100 * r['dev']['accuracy']:.1f} |")
    lines += ["", "## Results (dev)", "",
              "| task | system | lr | epochs | trainable params | % of encoder | dev accuracy | per seed | macro F1 "
              "| MCC |",
              "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for task, by_system in results.items():
        for name, runs in by_system.items():
            label = SYSTEMS[name].label + (" — chosen P-tuning v2" if name == chosen.get(task) else
                                           "".join(f" — best {p}-head candidate" for p, c in best_of.items()
                                                   if task == "sst2" and c == name))
            if "error" in runs:
                lines.append(f"| {task} | {label} | | | | | fails: {runs['error']} | | | |")
                continue
            first = next(iter(runs.values()))
            accs = [r["dev"]["accuracy"] for r in runs.values()]
            f1 = statistics.mean(r["dev"]["macro_f1"] for r in runs.values())
            mcc = statistics.mean(r["dev"]["mcc"] for r in runs.values())
            params = first["trainable_parameters"]
            lines.append(f"| {task} | {label} | {first['lr']:g} | {epochs_of(name, epochs):g} | {params:,} | "
                         f"{100 * params / total:.2f} | {pct(accs)} | {', '.join(f'{100 * a:.1f}' for a in accs)} | "
                         f"{f1:.3f} | {mcc:.3f} |")
    lines += summary(chosen, results, total, epochs, best_of)
    return "\n".join(lines) + "\n"


def summary(chosen: dict[str, str | None], results: dict, total: int, epochs: float,
            best_of: dict[str, str | None]) -> list[str]:
    """The comparison the issue asks for, in words, computed from the runs (nothing typed by hand).

    P-tuning v2 is compared with the *better* fine-tuning budget on dev; the verdict waits until every
    fine-tuning budget has run and both sides have at least two seeds.
    """
    out = ["", "## Summary", ""]
    for task, by_system in results.items():
        mine = chosen.get(task)
        done = {name: runs for name, runs in by_system.items() if "error" not in runs}
        acc = {name: statistics.mean(r["dev"]["accuracy"] for r in runs.values()) for name, runs in done.items()}
        tuned = [n for n in done if SYSTEMS[n].kind == "finetune"]
        if mine not in done or not tuned:
            continue
        ft = max(tuned, key=acc.__getitem__)
        seeds = min(len(done[n]) for n in [mine, *tuned])
        missing = [SYSTEMS[n].label for n in BASELINES
                   if SYSTEMS[n].kind == "finetune" and n not in done and fits(n, task, epochs)]
        gap = 100 * (acc[ft] - acc[mine])
        params = next(iter(done[mine].values()))["trainable_parameters"]
        verdict = "within" if gap <= 1 else "not within"
        line = (f"- {task}: P-tuning v2 {100 * acc[mine]:.1f} vs the better full fine-tuning "
                f"({SYSTEMS[ft].label}) {100 * acc[ft]:.1f} ({gap:+.2f} points for fine-tuning; "
                + (f"{verdict} 1 point" if seeds >= 2 and not missing else
                   f"provisional: {seeds} seed(s), not run yet: {', '.join(missing) or 'nothing'}")
                + "), training "
                f"{100 * params / total:.2f}% of the parameters")
        others = [n for n in dict.fromkeys(best_of.values()) if task == "sst2" and n and n != mine and n in acc]
        for other in others:
            other_gap = 100 * (acc[ft] - acc[other])
            line += (f"; the best {pooling_of(other)}-head candidate ({SYSTEMS[other].label}, not chosen) "
                     f"{100 * acc[other]:.1f} over {len(done[other])} seed(s) ({other_gap:+.2f} points for "
                     "fine-tuning)")
        if "head-only" in acc:
            line += f"; the linear probe reaches {100 * acc['head-only']:.1f}"
        if "head-only-mean" in acc:
            line += f" (on the mean-pooled output {100 * acc['head-only-mean']:.1f})"
        if "peft-prefix" in acc:
            line += f", PEFT's prefix tuning ({epochs_of('peft-prefix', epochs):g} epochs) " \
                    f"{100 * acc['peft-prefix']:.1f}"
        out.append(line + ".")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="sst2,rte")
    ap.add_argument("--baselines", default=",".join(BASELINES))
    ap.add_argument("--epochs", type=float, default=3)
    ap.add_argument("--out", default="runs/glue")
    ap.add_argument("--table", default="docs/ptuning_glue.md")
    ap.add_argument("--record", default="docs/results/ptuning_glue_runs.csv", help="one row per run (CSV)")
    ap.add_argument("--no-run", action="store_true", help="only tabulate the runs already done")
    args = ap.parse_args()
    root, record_path = Path(args.out), Path(args.record)
    record = read_record(record_path)
    selection = {n: get("sst2", n, 1, root, args.epochs, args.no_run, record) for n in CANDIDATES}
    selection = {n: r for n, r in selection.items() if r and "error" not in r}
    complete = len(selection) == len(CANDIDATES)
    tasks = args.tasks.split(",")
    chosen = {task: choose(selection, task, args.epochs) if complete else None for task in tasks}
    # SST-2 also runs the best candidate of each head type (cls, mean), so the head types compare over seeds
    best_of = {p: choose(selection, "sst2", args.epochs, p) if complete else None for p in ("cls", "mean")}
    results: dict = {}
    for task in tasks:
        # every task's choice runs on every task that allows its budget (SST-2 shows the 3-epoch choice too)
        picks = [chosen[task]] + [c for c in chosen.values() if c != chosen[task]]
        if task == "sst2":
            picks += list(best_of.values())
        names = list(dict.fromkeys(n for n in picks if n)) + args.baselines.split(",")
        for name in (n for n in names if fits(n, task, args.epochs)):
            runs = {}
            for seed in SIZES[task]["seeds"]:
                result = get(task, name, seed, root, args.epochs, args.no_run, record)
                if result and "error" in result:
                    runs = {"error": result["error"]}
                    break
                if result:
                    runs[seed] = result
            if runs:
                results.setdefault(task, {})[name] = runs
    write_record(record_path, record)
    text = table(selection, chosen, results, args.epochs, best_of)
    atomic_write_text(Path(args.table), text)
    print(text)


if __name__ == "__main__":
    main()
