"""End-to-end jobs behind the command line: train a run directory, evaluate it, score outputs.

A run directory holds ``run.json`` (everything needed to reproduce the run: data, format, model,
prefix and training configs, seed, versions, data fingerprint), ``log.jsonl``, ``loss.png``, the
resume state, and ``best/`` (the folded prefix, ``prefix_config.json`` + ``prefix.safetensors``).

Every job runs unchanged under ``torchrun`` / ``accelerate launch``: each rank loads the model and the
data, training is data-parallel (``train.fit``), evaluation and decoding are split over ranks and gathered
in source order, and only rank 0 writes the run directory and the predictions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefixtune.core.checkpoint import CONFIG_NAME
from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import PrefixModel, attach, load
from prefixtune.files import atomic_write_text
from prefixtune.io.hub import load_causal_lm
from prefixtune.tasks.data import (
    EncodedExample,
    Example,
    Format,
    encode_all,
    group_references,
    load_examples,
    shuffled_subset,
)
from prefixtune.tasks.decode import generate_texts
from prefixtune.training import distributed
from prefixtune.training.loop import LOG_NAME, STATE_NAME, TrainConfig, fit

RUN_NAME = "run.json"
E2E_LIKE = ("e2e",)


@dataclass(frozen=True)
class DataSpec:
    """Which data a run trains on and how text becomes tokens."""

    data: str = "e2e"
    split: str = "train"
    dev_split: str | None = "dev"
    dev_limit: int | None = 200
    train_limit: int | None = None
    source_field: str | None = None
    target_field: str | None = None
    max_length: int = 256
    on_too_long: str = "error"
    separator: str = "\n"
    target_prefix: str = " "

    @property
    def format(self) -> Format:
        return Format(separator=self.separator, target_prefix=self.target_prefix)

    def load(self, split: str) -> list[Example]:
        return load_examples(self.data, split, source_field=self.source_field, target_field=self.target_field)


def _fingerprint_examples(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.source.encode() + b"\0" + ex.target.encode() + b"\n")
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import safetensors
    import transformers

    return {"prefixtune": importlib.metadata.version("prefixtune"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


_RESUMABLE_CHANGES = {"max_steps", "eval_every", "early_stopping", "log_every", "checkpoint_every",
                      "batch_size"}  # batch_size: per rank; the global batch is checked instead


def _global_batch(record: dict[str, Any]) -> int:
    """Examples per accumulation micro-step over all ranks (runs written before ranks existed: one rank)."""
    return record.get("distributed", {}).get("global_batch_size", record.get("train", {}).get("batch_size"))


def _check_resume(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a run with settings that would change what it computes."""
    diffs = []
    for section in ("model", "data", "prefix", "train"):
        a, b = saved.get(section, {}), current[section]
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in _RESUMABLE_CHANGES:
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: saved {a.get(key)!r}, now {b.get(key)!r}")
    if _global_batch(saved) != _global_batch(current):
        ranks = current["distributed"]["world_size"]
        diffs.append(f"global batch (--batch-size × ranks): saved {_global_batch(saved)}, now "
                     f"{current['train']['batch_size']} × {ranks} = {_global_batch(current)}")
    if current["data_fingerprint"] != saved.get("data_fingerprint"):
        diffs.append("the training examples differ (data_fingerprint)")
    if diffs:
        raise ValueError(f"{path}: --resume with other settings than the saved run: " + "; ".join(diffs))


def prepare_data(tokenizer: Any, data: DataSpec, seed: int
                 ) -> tuple[list[Example], list[EncodedExample], list[EncodedExample] | None]:
    """Training examples (seeded subset), their encodings, and the encoded dev subset (or None)."""
    examples = data.load(data.split)
    if data.train_limit is not None:
        examples = shuffled_subset(examples, data.train_limit, seed)
    fmt = data.format
    encoded, changed = encode_all(tokenizer, examples, fmt, data.max_length, data.on_too_long)
    if changed and distributed.is_main():
        print(f"note: {changed} training example(s) {data.on_too_long} (longer than --max-length "
              f"{data.max_length})", file=sys.stderr)
    dev_encoded = None
    if data.dev_split:
        dev = data.load(data.dev_split)
        if data.dev_limit is not None:
            dev = shuffled_subset(dev, min(data.dev_limit, len(dev)), 0)
        dev_encoded, _ = encode_all(tokenizer, dev, fmt, data.max_length, "truncate")
    return examples, encoded, dev_encoded


def _on_main(fn: Any) -> Any:
    """``fn()`` run by rank 0 only (it reads or writes the run directory); its result, or the error it
    raised, on every rank, so that all ranks stop with the same message."""
    result: Any = None
    if distributed.is_main():
        try:
            result = ("ok", fn())
        except (ValueError, FileNotFoundError, FileExistsError) as exc:
            result = ("error", exc)
    kind, value = distributed.broadcast_object(result)
    if kind == "error":
        raise value
    return value


def _check_fresh(out: Path, resume: bool) -> None:
    def check() -> None:
        if not resume and (out / STATE_NAME).exists():
            raise FileExistsError(f"{out} already holds a run ({STATE_NAME}); use --resume, or another --out")

    _on_main(check)


def _distributed_record(train: TrainConfig, fsdp: bool) -> dict[str, Any]:
    world = distributed.world_size()
    return {"world_size": world, "global_batch_size": train.batch_size * world,
            "effective_batch_size": train.batch_size * world * train.grad_accum, "fsdp": fsdp}


def _place(pm: PrefixModel, record: dict[str, Any]) -> PrefixModel:
    """Put the model on this rank's device; with FSDP, shard the frozen base model's blocks first (their
    paths go to ``record["distributed"]["sharded_blocks"]``).

    The blocks holding the weights that fingerprint the base model in saved prefixes (input embeddings,
    the last prefixed attention layer) stay whole, so that rank 0 can save a prefix on its own.
    """
    if record["distributed"]["fsdp"] and distributed.world_size() > 1:
        embeddings = pm.base.get_input_embeddings()
        keep = [name for name, module in pm.base.named_modules() if module is embeddings]
        sharded = distributed.shard_model(pm.base, keep_whole=[*keep, pm.spec.slots[-1][0]])
        record["distributed"]["sharded_blocks"] = sharded
    return pm.to(distributed.device())


def _fit_run(out: Path, pm: PrefixModel, record: dict[str, Any], train_set: list[Any], dev: list[Any] | None,
             train: TrainConfig, pad_id: int, resume: bool, progress: bool, collate_fn: Any = None) -> Any:
    """Write (or, resuming, check) ``run.json``, train with the best prefix kept in ``best/``, plot the log."""
    run_path = out / RUN_NAME

    def write_or_check_record() -> None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and run_path.is_file():
            _check_resume(json.loads(run_path.read_text()), record, run_path)
        else:
            atomic_write_text(run_path, json.dumps(record, indent=2) + "\n")

    _on_main(write_or_check_record)

    def save_best(directory: Path) -> None:
        pm.save_pretrained(directory)
        atomic_write_text(directory / RUN_NAME, json.dumps(record, indent=2) + "\n")

    extra = {"collate_fn": collate_fn} if collate_fn is not None else {}
    state = fit(pm, train_set, out, train, pad_id, dev=dev, resume=resume, save_best=save_best, progress=progress,
                **extra)
    if distributed.is_main():
        from prefixtune.training.plots import plot_log

        plot_log(out / LOG_NAME, out / "loss.png")
    return state


def train_run(
    out_dir: str | Path,
    model_name: str,
    data: DataSpec,
    prefix: PrefixConfig,
    train: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    fsdp: bool = False,
) -> dict[str, Any]:
    """Prefix-tune ``model_name`` on ``data``; writes the run directory and returns a summary.

    Under ``torchrun`` every rank calls this with the same arguments (``train.batch_size`` is per rank);
    ``fsdp=True`` shards the frozen base model's blocks over the ranks (FSDP2) instead of copying it whole.
    """
    distributed.init_from_env()
    out = Path(out_dir)
    _check_fresh(out, resume)
    with distributed.main_first():  # one download into a shared cache
        model, tokenizer = load_causal_lm(model_name)
    examples, encoded, dev_encoded = prepare_data(tokenizer, data, train.seed)
    record = {
        "model": {"name": model_name},
        "data": dataclasses.asdict(data),
        "prefix": prefix.to_dict(),
        "train": dataclasses.asdict(train),
        "data_fingerprint": _fingerprint_examples(examples),
        "num_train_examples": len(encoded),
        "distributed": _distributed_record(train, fsdp),
        "versions": _versions(),
        "argv": sys.argv,
    }
    torch.manual_seed(train.seed)
    pm = _place(attach(model, prefix, tokenizer), record)
    record["prefix"] = pm.prefix_config.to_dict()  # the init text may have set the length
    record["trainable_parameters"] = pm.num_trainable_parameters()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    state = _fit_run(out, pm, record, encoded, dev_encoded, train, pad_id, resume, progress)
    losses = [r["loss"] for r in state.history if "loss" in r]
    return {"out": str(out), "steps": state.step, "stopped": state.stopped, "best_dev_loss": state.best_dev_loss,
            "best_step": state.best_step, "final_train_loss": losses[-1] if losses else None,
            "trainable_parameters": record["trainable_parameters"]}


def locate_run(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """The saved-prefix folder of a run directory (its ``best/`` when there is one) and the run record."""
    path = Path(run_dir)
    prefix_dir = path / "best" if (path / "best" / CONFIG_NAME).is_file() else path
    run_path = prefix_dir / RUN_NAME if (prefix_dir / RUN_NAME).is_file() else path / RUN_NAME
    if not run_path.is_file():
        raise FileNotFoundError(f"{run_path}: missing; {path} is not a prefixtune run directory")
    return prefix_dir, json.loads(run_path.read_text())


def load_trained(run_dir: str | Path) -> tuple[PrefixModel, Any, dict[str, Any]]:
    """The prefix model, tokenizer and run record of a run directory (or of its ``best/``)."""
    prefix_dir, record = locate_run(run_dir)
    model, tokenizer = load_causal_lm(record["model"]["name"])
    return load(prefix_dir, model), tokenizer, record


def metrics_for(data: str, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """E2E: BLEU, NIST, METEOR, ROUGE-L, CIDEr (official-script style); others: BLEU (+ TER, METEOR)."""
    from prefixtune.tasks import metrics

    if data in E2E_LIKE:
        return metrics.e2e_metrics(predictions, references)
    return metrics.generation_metrics(predictions, references)


def reference_groups(data: str, split: str, limit: int | None, source_field=None, target_field=None
                     ) -> tuple[list[str], list[list[str]]]:
    examples = load_examples(data, split, source_field=source_field, target_field=target_field)
    sources, refs = group_references(examples)
    if limit is not None:
        sources, refs = sources[:limit], refs[:limit]
    return sources, refs


def write_outputs(predictions_path: str | Path, predictions: list[str], metrics: dict[str, Any]) -> Path:
    """Predictions one per line, and ``<predictions>.metrics.json`` beside them (both atomic)."""
    path = Path(predictions_path)
    atomic_write_text(path, "".join(p.replace("\n", " ") + "\n" for p in predictions))
    metrics_path = path.with_name(path.name + ".metrics.json")
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    return metrics_path


def evaluate_run(
    run_dir: str | Path,
    data: str | None,
    split: str,
    predictions_path: str | Path,
    limit: int | None = None,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Decode one output per unique source of ``split``, write them in source order, score them.

    Under ``torchrun`` each rank decodes every ``ranks``-th source; rank 0 gathers them in source order,
    scores them and writes the files; every rank returns the metrics.
    """
    distributed.init_from_env()
    with distributed.main_first():
        pm, tokenizer, record = load_trained(run_dir)
    pm.to(distributed.device())
    spec = DataSpec(**record["data"])
    data = data or spec.data
    sources, refs = reference_groups(data, split, limit, spec.source_field, spec.target_field)
    preds = distributed.map_in_order(
        lambda part: generate_texts(pm, tokenizer, part, spec.format, batch_size=batch_size, num_beams=num_beams,
                                    max_new_tokens=max_new_tokens, progress=progress and distributed.is_main()),
        sources)

    def score_and_write() -> dict[str, Any]:
        result = {"data": data, "split": split, "sources": len(sources), "num_beams": num_beams,
                  **metrics_for(data, preds, refs)}
        write_outputs(predictions_path, preds, result)
        return result

    return _on_main(score_and_write)


def demo(out_dir: str | Path, train_limit: int = 300, epochs: float = 1.0, eval_limit: int = 40,
         model_name: str = "smollm2-135m") -> dict[str, Any]:
    """The README's main job: a short real prefix-tuning run on E2E, then E2E metrics on the first
    ``eval_limit`` test MRs for the untrained model and for the prefix-tuned one."""
    out = Path(out_dir)
    if (out / STATE_NAME).exists():
        import shutil

        shutil.rmtree(out)  # the demo always starts fresh; real runs refuse to overwrite
    data = DataSpec(train_limit=train_limit, dev_limit=100)
    prefix = PrefixConfig(prefix_length=10, reparam=True, reparam_hidden=512, init="text:table-to-text:")
    train = TrainConfig(epochs=epochs, batch_size=8, lr=5e-4, warmup_steps=5, eval_every=None, log_every=5)
    print(f"demo: prefix-tuning {model_name} on {train_limit} E2E training examples for {epochs:g} epoch(s)")
    summary = train_run(out, model_name, data, prefix, train)
    pm, tokenizer, _record = load_trained(out)
    sources, refs = reference_groups("e2e", "test", eval_limit)
    rows = {}
    with pm.disabled():
        base_preds = generate_texts(pm, tokenizer, sources, data.format, batch_size=20, max_new_tokens=48)
    rows["untrained (no prefix)"] = metrics_for("e2e", base_preds, refs)
    preds = generate_texts(pm, tokenizer, sources, data.format, batch_size=20, max_new_tokens=48)
    rows["prefix-tuned"] = metrics_for("e2e", preds, refs)
    write_outputs(out / "test_predictions.txt", preds, rows["prefix-tuned"])
    print(f"\nE2E test, first {len(sources)} MRs, greedy decoding ({summary['trainable_parameters']:,} trainable "
          f"parameters, {summary['steps']} steps, final train loss {summary['final_train_loss']:.3f})")
    keys = list(rows["prefix-tuned"])
    print(f"{'system':24s}" + "".join(f"{k:>9s}" for k in keys))
    for name, m in rows.items():
        print(f"{name:24s}" + "".join(f"{m[k]:9.4f}" for k in keys))
    print(f"\nexample: {sources[0]}\n  untrained: {base_preds[0]}\n  prefix-tuned: {preds[0]}")
    print(f"run directory: {out} (log.jsonl, loss.png, best/, test_predictions.txt)")
    return rows


# ----------------------------------------------------------------------------- classification (P-tuning v2)


@dataclass(frozen=True)
class ClassifySpec:
    """Which labelled data a classification run trains on."""

    data: str = "sst2"
    split: str = "train"
    dev_split: str | None = "dev"
    train_limit: int | None = None
    text_field: str | None = None
    text_pair_field: str | None = None
    label_field: str | None = None
    max_length: int = 128

    def load(self, split: str, labels: tuple[str, ...] | None = None):
        from prefixtune.tasks.glue import load_classification

        return load_classification(self.data, split, text_field=self.text_field, text_pair_field=self.text_pair_field,
                                   label_field=self.label_field, labels=labels)


def load_classifier_base(model_name: str, num_labels: int) -> tuple[Any, Any]:
    """A transformers sequence-classification model (new head, sdpa attention) and its tokenizer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from prefixtune.io.hub import resolve_model

    path = resolve_model(model_name)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, attn_implementation="sdpa")
    return model, AutoTokenizer.from_pretrained(path)


def train_classifier_run(
    out_dir: str | Path,
    model_name: str,
    data: ClassifySpec,
    prefix: PrefixConfig,
    train: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    fsdp: bool = False,
) -> dict[str, Any]:
    """P-tuning v2: train a prefix and the task head of a frozen encoder; returns a summary with dev metrics.

    ``prefix.prefix_length = 0`` trains the head alone (a linear probe). Runs under ``torchrun`` as
    ``train_run`` does.
    """
    from prefixtune.tasks.classification import (
        attach_classifier,
        classification_metrics,
        collate_classes,
        encode_examples,
        predict,
    )

    distributed.init_from_env()
    out = Path(out_dir)
    _check_fresh(out, resume)
    examples, labels = data.load(data.split)
    if data.train_limit is not None:
        examples = shuffled_subset(examples, data.train_limit, train.seed)
    torch.manual_seed(train.seed)
    with distributed.main_first():
        model, tokenizer = load_classifier_base(model_name, len(labels))
    encoded = encode_examples(tokenizer, examples, data.max_length)
    dev = encode_examples(tokenizer, data.load(data.dev_split, labels)[0], data.max_length) if data.dev_split else None
    pm = attach_classifier(model, prefix)
    record = {"task": "classify", "model": {"name": model_name}, "data": dataclasses.asdict(data),
              "labels": list(labels), "prefix": pm.prefix_config.to_dict(), "train": dataclasses.asdict(train),
              "data_fingerprint": hashlib.sha256(repr([(e.text, e.text_pair, e.label) for e in examples]).encode())
              .hexdigest(), "num_train_examples": len(encoded), "distributed": _distributed_record(train, fsdp),
              "versions": _versions(), "argv": sys.argv, "trainable_parameters": pm.num_trainable_parameters()}
    pm = _place(pm, record)
    pad_id = tokenizer.pad_token_id or 0
    state = _fit_run(out, pm, record, encoded, dev, train, pad_id, resume, progress, collate_classes)
    summary = {"out": str(out), "steps": state.step, "stopped": state.stopped,
               "trainable_parameters": record["trainable_parameters"]}
    if dev:
        def dev_metrics() -> dict[str, float]:  # rank 0 alone reads best/ (no shared file system needed)
            best, _, _ = load_trained_classifier(out)
            best.to(distributed.device())
            return classification_metrics(predict(best, dev, pad_id), [d.label for d in dev])

        summary["dev"] = _on_main(dev_metrics)
    return summary


def load_trained_classifier(run_dir: str | Path) -> tuple[PrefixModel, Any, dict[str, Any]]:
    """The classifier (prefix + head), tokenizer and run record of a classification run directory."""
    prefix_dir, record = locate_run(run_dir)
    model, tokenizer = load_classifier_base(record["model"]["name"], len(record["labels"]))
    return load(prefix_dir, model), tokenizer, record


def evaluate_classifier_run(run_dir: str | Path, data: str | None, split: str, limit: int | None = None,
                            predictions_path: str | Path | None = None) -> dict[str, Any]:
    """Accuracy, macro F1 and MCC of a classification run on ``split``; predictions as label names.

    Under ``torchrun`` the examples are split over ranks; rank 0 writes the predictions."""
    from prefixtune.tasks.classification import classification_metrics, encode_examples, predict

    distributed.init_from_env()
    with distributed.main_first():
        pm, tokenizer, record = load_trained_classifier(run_dir)
    pm.to(distributed.device())
    spec = ClassifySpec(**record["data"])
    if data:
        spec = dataclasses.replace(spec, data=data)
    labels = tuple(record["labels"])
    examples, _ = spec.load(split, labels)
    examples = examples[:limit] if limit else examples
    encoded = encode_examples(tokenizer, examples, spec.max_length)
    preds = distributed.map_in_order(lambda part: predict(pm, part, tokenizer.pad_token_id or 0), encoded)
    result = {"data": spec.data, "split": split, "examples": len(examples),
              **classification_metrics(preds, [e.label for e in examples])}
    if predictions_path and distributed.is_main():
        write_outputs(predictions_path, [labels[p] for p in preds], result)
    distributed.barrier()
    return result


def run_task(run_dir: str | Path) -> str:
    """'classify' or 'generate', from a run directory's record."""
    return locate_run(run_dir)[1].get("task", "generate")
