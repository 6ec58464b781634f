"""One job per verb, over the `Task` interface: ``train``, ``evaluate``, ``score``, ``generate``, ``demo``.

Every job runs unchanged under ``torchrun`` / ``accelerate launch``: each rank loads the model and the
data, training is data-parallel (``loop.fit``), evaluation and decoding are split over ranks and gathered
in source order, and only rank 0 writes the run directory (``runs``) and the predictions.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import PrefixModel, load
from prefixtune.errors import DataError
from prefixtune.files import atomic_write_text
from prefixtune.tasks.generation import DataSpec, GenerationTask
from prefixtune.tasks.metrics import read_predictions
from prefixtune.tasks.readers import shuffled_subset
from prefixtune.tasks.task import DecodeConfig, Task
from prefixtune.training import distributed
from prefixtune.training.config import TrainConfig
from prefixtune.training.loop import fit
from prefixtune.training.plots import plot_log
from prefixtune.training.runs import FILES, RunRecord, check_resume, data_fingerprint, locate_run, versions


def training_records(task: Task, seed: int) -> list[Any]:
    """The training split's records: a seeded subset of ``train_limit`` of them where it is set."""
    records = task.read(task.spec.split)
    return shuffled_subset(records, task.spec.train_limit, seed) if task.spec.train_limit is not None else records


def encode_data(task: Task, tokenizer: Any, records: list[Any]) -> tuple[list[Any], list[Any] | None]:
    """The encoded training records (with a note on rank 0 of how many the too-long policy changed) and the
    encoded dev set (None without a dev split)."""
    encoded, changed = task.encode(tokenizer, records, training=True)
    if changed and distributed.is_main():  # only a task with a too-long policy (generation) counts any
        print(f"note: {changed} training example(s) {task.spec.on_too_long} (longer than --max-length "
              f"{task.spec.max_length})", file=sys.stderr)
    dev = None
    if task.spec.dev_split:
        dev, _ = task.encode(tokenizer, task.dev_records(task.read(task.spec.dev_split)), training=False)
    return encoded, dev


def prepare_data(task: Task, tokenizer: Any, seed: int) -> tuple[list[Any], list[Any], list[Any] | None]:
    """Training records (a seeded subset of ``train_limit``), their encodings, and the encoded dev set (or None)."""
    records = training_records(task, seed)
    return (records, *encode_data(task, tokenizer, records))


def _check_fresh(out: Path, resume: bool) -> None:
    def check() -> None:
        if not resume and (out / FILES.state).exists():
            raise FileExistsError(f"{out} already holds a run ({FILES.state}); use --resume, or another --out")

    distributed.on_main(check)


def _distributed_record(train: TrainConfig, fsdp: bool) -> dict[str, Any]:
    world = distributed.world_size()
    return {"world_size": world, "global_batch_size": train.batch_size * world,
            "effective_batch_size": train.batch_size * world * train.grad_accum, "fsdp": fsdp}


def _place(pm: PrefixModel, fsdp: bool) -> tuple[PrefixModel, list[str] | None]:
    """Put the model on this rank's device; with FSDP, shard the frozen base model's blocks first (returns
    their paths).

    The base model's fingerprint (saved with every prefix) is taken before sharding, so that rank 0 can save
    a prefix on its own; the input embeddings and the last prefixed attention layer stay whole as well (the
    first prefix format's fingerprint reads them).
    """
    sharded = None
    if fsdp and distributed.world_size() > 1:
        pm.base_fingerprint()
        embeddings = pm.base.get_input_embeddings()
        keep = [name for name, module in pm.base.named_modules() if module is embeddings]
        sharded = distributed.shard_model(pm.base, keep_whole=[*keep, pm.spec.slots[-1][0]])
    return pm.to(distributed.device()), sharded


def _fit_run(out: Path, pm: PrefixModel, record: RunRecord, task: Task, encoded: list[Any], dev: list[Any] | None,
             train: TrainConfig, pad_id: int, resume: bool, progress: bool) -> Any:
    """Write (or, resuming, check) ``run.json``, train with the best prefix kept in ``best/``, plot the log."""
    run_path = out / FILES.record

    def write_or_check_record() -> None:
        out.mkdir(parents=True, exist_ok=True)
        if resume and run_path.is_file():
            check_resume(RunRecord.read(run_path), record, run_path)
        else:
            record.write(run_path)

    distributed.on_main(write_or_check_record)

    def save_best(directory: Path) -> None:
        pm.save_pretrained(directory)
        record.write(directory / FILES.record)

    state = fit(pm, encoded, out, train, pad_id, dev=dev, resume=resume, save_best=save_best, progress=progress,
                collate_fn=task.collate)
    if distributed.is_main():
        plot_log(out / FILES.log, out / FILES.plot)
    return state


def train_run(out_dir: str | Path, model_name: str, task: Task, prefix: PrefixConfig, train: TrainConfig,
              resume: bool = False, progress: bool = True, fsdp: bool = False) -> dict[str, Any]:
    """Prefix-tune ``model_name`` on ``task``; writes the run directory and returns a summary (for a task with
    classes and a dev split, with the saved best prefix's dev metrics).

    Under ``torchrun`` every rank calls this with the same arguments (``train.batch_size`` is per rank);
    ``fsdp=True`` shards the frozen base model's blocks over the ranks (FSDP2) instead of copying it whole.
    """
    distributed.init_from_env()
    out = Path(out_dir)
    _check_fresh(out, resume)
    records = training_records(task, train.seed)  # first: a classification head's size is its label count
    torch.manual_seed(train.seed)  # before the model: a classification head is new (loading draws nothing else)
    with distributed.main_first():  # one download into a shared cache
        model, tokenizer = task.load_model(model_name)
    encoded, dev = encode_data(task, tokenizer, records)
    pm = task.attach(model, prefix, tokenizer)
    pm, sharded = _place(pm, fsdp)
    dist_record = _distributed_record(train, fsdp) | ({"sharded_blocks": sharded} if sharded is not None else {})
    record = RunRecord(task=task.kind, model={"name": model_name}, data=task.spec, labels=task.labels,
                       prefix=pm.prefix_config,  # the init text may have set the length
                       train=train, data_fingerprint=data_fingerprint(task.fingerprint_rows(records)),
                       num_train_examples=len(encoded), distributed=dist_record, versions=versions(),
                       argv=list(sys.argv), trainable_parameters=pm.num_trainable_parameters())
    pad_id = task.pad_id(tokenizer)
    state = _fit_run(out, pm, record, task, encoded, dev, train, pad_id, resume, progress)
    losses = [r["loss"] for r in state.history if "loss" in r]
    summary = {"out": str(out), "steps": state.step, "stopped": state.stopped, "best_dev_loss": state.best_dev_loss,
               "best_step": state.best_step, "final_train_loss": losses[-1] if losses else None,
               "trainable_parameters": record.trainable_parameters}
    if task.labels is not None and dev:  # classification: the best prefix's dev metrics
        summary["dev"] = distributed.on_main(lambda: _dev_metrics(out, task))
    return summary


def _dev_metrics(out: Path, task: Task) -> dict[str, float | None]:
    """The saved best prefix's metrics on the dev split (rank 0 alone reads ``best/``: no shared file system)."""
    pm, tokenizer, _, _ = load_trained(out)
    pm.to(distributed.device())
    inputs, refs = task.eval_set(task.spec.dev_split, None)
    return task.score(task.predict(pm, tokenizer, inputs, DecodeConfig()), refs)


def load_trained(run_dir: str | Path, data: str | None = None) -> tuple[PrefixModel, Any, RunRecord, Task]:
    """The prefix model, tokenizer, run record and task (on ``data`` if given) of a run directory (or its ``best/``)."""
    prefix_dir, record = locate_run(run_dir)
    task = record.make_task(data)
    model, tokenizer = task.load_model(record.model_name)
    return load(prefix_dir, model), tokenizer, record, task


def write_outputs(predictions_path: str | Path, predictions: Sequence[str], metrics: dict[str, Any]) -> Path:
    """Predictions one per line, and ``<predictions>.metrics.json`` beside them (both atomic)."""
    path = Path(predictions_path)
    atomic_write_text(path, "".join(p.replace("\n", " ") + "\n" for p in predictions))
    metrics_path = path.with_name(path.name + ".metrics.json")
    atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")
    return metrics_path


def evaluate_run(run_dir: str | Path, data: str | None, split: str | None, predictions_path: str | Path | None,
                 limit: int | None = None, decode: DecodeConfig = DecodeConfig(),  # noqa: B008 (frozen)
                 progress: bool = True) -> dict[str, Any]:
    """Predict one output per source (generation) or example (classification) of ``split`` (default: the
    task's ``eval_split``), score them, and write them (in order) when ``predictions_path`` is given.

    Under ``torchrun`` each rank predicts every ``ranks``-th input; rank 0 gathers them in order, scores them
    and writes the files; every rank returns the metrics.
    """
    distributed.init_from_env()
    with distributed.main_first():
        pm, tokenizer, _, task = load_trained(run_dir, data)
    pm.to(distributed.device())
    split = split or EVAL_SPLIT[task.kind]
    inputs, refs = task.eval_set(split, limit)
    preds = distributed.map_in_order(
        lambda part: task.predict(pm, tokenizer, part, decode, progress=progress and distributed.is_main()), inputs)

    def score_and_write() -> dict[str, Any]:
        result = {"data": task.spec.data, "split": split, task.unit: len(inputs), **task.decode_record(decode),
                  **task.score(preds, refs)}
        if predictions_path:
            write_outputs(predictions_path, preds, result)
        return result

    return distributed.on_main(score_and_write)


# the split ``eval`` reads by default: generation data sets have a test split, GLUE's labelled ones only dev
EVAL_SPLIT = {"generate": "test", "classify": "dev"}


def score_outputs(task: Task, split: str, predictions_path: str | Path, limit: int | None = None) -> dict[str, Any]:
    """Metrics of any system's outputs (one line per source / example of ``split``) against the references."""
    inputs, refs = task.eval_set(split, limit)
    preds = read_predictions(predictions_path)
    if len(preds) != len(refs):
        raise DataError(f"{predictions_path}: {len(preds)} predictions, but {task.spec.data} {split} has "
                        f"{len(refs)} {'unique sources' if task.unit == 'sources' else task.unit}"
                        + (f" (first {limit})" if limit else ""))
    return {"data": task.spec.data, "split": split, task.unit: len(inputs), **task.score(preds, refs)}


def generate_outputs(run_dir: str | Path, sources: Sequence[str], decode: DecodeConfig = DecodeConfig()  # noqa: B008
                     ) -> list[str]:
    """The trained run's output for each source text (a label name for classification runs)."""
    pm, tokenizer, _, task = load_trained(run_dir)
    if not isinstance(task, GenerationTask):
        raise DataError(f"{run_dir}: generate needs a generation run; this one classifies (use eval)")
    return task.predict(pm, tokenizer, list(sources), decode)


def demo(out_dir: str | Path = "runs/demo", train_limit: int = 300, epochs: float = 1.0, eval_limit: int = 40,
         model_name: str = "smollm2-135m") -> dict[str, Any]:
    """The README's main job: a short real prefix-tuning run on E2E, then E2E metrics on the first
    ``eval_limit`` test MRs for the untrained model and for the prefix-tuned one."""
    out = Path(out_dir)
    if (out / FILES.state).exists():
        shutil.rmtree(out)  # the demo always starts fresh; real runs refuse to overwrite
    task = GenerationTask(DataSpec(train_limit=train_limit, dev_limit=100))
    prefix = PrefixConfig(prefix_length=10, reparam=True, reparam_hidden=512, init="text:table-to-text:")
    train = TrainConfig(epochs=epochs, batch_size=8, lr=5e-4, warmup_steps=5, eval_every=None, log_every=5)
    print(f"demo: prefix-tuning {model_name} on {train_limit} E2E training examples for {epochs:g} epoch(s)")
    summary = train_run(out, model_name, task, prefix, train)
    pm, tokenizer, _, task = load_trained(out)
    sources, refs = task.eval_set("test", eval_limit)
    decode = DecodeConfig(max_new_tokens=48, batch_size=20)
    with pm.disabled():
        base_preds = task.predict(pm, tokenizer, sources, decode, progress=True)
    rows = {"untrained (no prefix)": task.score(base_preds, refs)}
    preds = task.predict(pm, tokenizer, sources, decode, progress=True)
    rows["prefix-tuned"] = task.score(preds, refs)
    write_outputs(out / FILES.demo_predictions, preds, rows["prefix-tuned"])
    print(f"\nE2E test, first {len(sources)} MRs, greedy decoding ({summary['trainable_parameters']:,} trainable "
          f"parameters, {summary['steps']} steps, final train loss {summary['final_train_loss']:.3f})")
    keys = list(rows["prefix-tuned"])
    print(f"{'system':24s}" + "".join(f"{k:>9s}" for k in keys))
    for name, m in rows.items():
        print(f"{name:24s}" + "".join(f"{m[k]:9.4f}" if m[k] is not None else f"{'-':>9s}" for k in keys))
    print(f"\nexample: {sources[0]}\n  untrained: {base_preds[0]}\n  prefix-tuned: {preds[0]}")
    print(f"run directory: {out} ({FILES.log}, {FILES.plot}, {FILES.best}/, {FILES.demo_predictions})")
    return rows
