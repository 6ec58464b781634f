"""One table-to-text run of SmolLM2-135M from a frozen spec (E2E, WebNLG 2017 or DART): train, decode,
score, one result row. Resumable.

Shared by ``quality_e2e.py`` (the low-data quality bar), ``paper_findings.py`` (the paper's ablations) and
``table2text.py`` (WebNLG seen/unseen, DART and E2E decoded with beam search). A run lives in
``<root>/<spec.key>/``; its ``result.json`` is written last (atomically), so a finished run is reused and an
interrupted one resumes from its training checkpoint.

Systems:
  - ``prefixtune``: this library (any ``PrefixConfig``: length, mode, reparameterization, init);
  - ``peft``: PEFT's ``PrefixTuningConfig`` (projection MLP when ``reparam``), trained by the same loop;
  - ``finetune``: every weight of the model trained.
All three see the same seeded training subset, batches, optimizer, schedule and decoding.

Evaluation sets (``test_limit`` / ``dev_limit`` sources, each with all its references):
  - E2E: the first N MRs of the split (as every earlier E2E table);
  - WebNLG test: N/2 sources of seen categories and N/2 of unseen ones, each a seeded (0) shuffle, scored
    apart ("seen", "unseen") and together ("all"); WebNLG dev and DART: N sources, a seeded (0) shuffle.
The test set is decoded with ``beams`` (the paper: 5; ``early_stopping``: a source is done once its beam holds
``beams`` finished outputs); the dev set, used only to choose settings, greedily.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from prefixtune import PrefixConfig  # noqa: E402
from prefixtune.files import atomic_write_text  # noqa: E402
from prefixtune.io.hub import load_causal_lm  # noqa: E402
from prefixtune.tasks import metrics  # noqa: E402
from prefixtune.tasks.decode import generate_texts  # noqa: E402
from prefixtune.tasks.encoding import collate  # noqa: E402
from prefixtune.tasks.generation import DataSpec, GenerationTask  # noqa: E402
from prefixtune.tasks.metrics import MeteorScorer, MeteorUnavailableError  # noqa: E402
from prefixtune.tasks.readers import group_references, shuffled_subset  # noqa: E402
from prefixtune.training.loop import TrainConfig, fit  # noqa: E402
from prefixtune.training.pipeline import load_trained, prepare_data, train_run  # noqa: E402

MODEL = "smollm2-135m"
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
SYSTEMS = ("prefixtune", "peft", "finetune")


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run (and nothing else: equal specs share a directory)."""

    system: str = "prefixtune"
    prefix_length: int = 10
    mode: str = "prefix"
    reparam: bool = True
    reparam_hidden: int = 512
    init: str = "random"
    init_std: float = 0.02
    lr: float = 5e-4
    train_limit: int = 500
    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 16
    warmup_steps: int = 10
    seed: int = 42
    test_limit: int = 100  # first N test MRs
    dev_limit: int = 0  # first N dev MRs decoded and scored too (for choosing settings), 0 for none
    max_new_tokens: int = 48
    # added with WebNLG / DART; left out of the key's digest at these defaults, so older E2E keys stay valid
    data: str = "e2e"
    train_split: str = "train"  # DART: "dev" (the shared data has no DART train split)
    beams: int = 1  # test decoding; dev decoding is greedy
    max_length: int = 256
    group_by_length: bool = False

    def __post_init__(self) -> None:
        if self.system not in SYSTEMS:
            raise ValueError(f"system must be one of {SYSTEMS}, got {self.system!r}")

    @property
    def key(self) -> str:
        """A readable directory name, unique per spec."""
        if self.system == "finetune":
            shape = "full"
        else:
            shape = f"P{self.prefix_length}-{self.mode}-" + (f"mlp{self.reparam_hidden}" if self.reparam else "flat")
        init = "rand" if self.init == "random" else "txt-" + re.sub(r"[^a-z0-9]+", "", self.init[5:].lower())[:16]
        if self.init == "random" and self.init_std != 0.02:
            init += f"{self.init_std:g}"
        budget = f"n{self.train_limit}-" + (f"st{self.max_steps}" if self.max_steps else f"ep{self.epochs:g}")
        fields = {k: v for k, v in dataclasses.asdict(self).items() if LATER_DEFAULTS.get(k, object()) != v}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:6]
        data = "" if self.data == "e2e" else f"{self.data}-"
        beams = f"-beam{self.beams}" if self.beams > 1 else ""
        run = f"{self.system}-{shape}-{init}-lr{self.lr:g}-{budget}-b{self.batch_size}-s{self.seed}"
        return f"{data}{run}{beams}-{digest}"

    def prefix_config(self) -> PrefixConfig:
        return PrefixConfig(prefix_length=self.prefix_length, mode=self.mode, reparam=self.reparam,
                            reparam_hidden=self.reparam_hidden, init=self.init, init_std=self.init_std)

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, max_steps=self.max_steps, batch_size=self.batch_size, lr=self.lr,
                           warmup_steps=self.warmup_steps, seed=self.seed, eval_every=None, log_every=5,
                           checkpoint_every=20 if self.system != "finetune" else 10_000,
                           group_by_length=self.group_by_length)

    def data_spec(self) -> DataSpec:
        dev_split = None if self.train_split == "dev" else "dev"  # the dev loss never reads training data
        return DataSpec(data=self.data, split=self.train_split, dev_split=dev_split, train_limit=self.train_limit,
                        dev_limit=100, max_length=self.max_length)


LATER_DEFAULTS = {"data": "e2e", "train_split": "train", "beams": 1, "max_length": 256, "group_by_length": False}


def _right_pad(batch, pad_id):
    return collate(batch, pad_id, padding_side="right")


EvalSet = tuple[list[str], list[list[str]]]  # sources, the references of each


def eval_sets(spec: RunSpec, split: str, limit: int) -> dict[str, EvalSet]:
    """The named evaluation subsets of ``split`` (see the module docstring); the same for every run."""
    task = GenerationTask(spec.data_spec())
    if spec.data == "e2e":
        return {"all": task.eval_set(split, limit)}
    if spec.data == "webnlg" and split == "test":
        examples = task.read(split)
        sets = {}
        for mark in ("seen", "unseen"):
            sources, refs = group_references([ex for ex in examples if ex.meta["seen"] == mark])
            idx = shuffled_subset(range(len(sources)), min(limit // 2, len(sources)), 0)
            sets[mark] = ([sources[i] for i in idx], [refs[i] for i in idx])
        return sets
    sources, refs = task.eval_set(split, None)
    idx = shuffled_subset(range(len(sources)), min(limit, len(sources)), 0)
    return {"all": ([sources[i] for i in idx], [refs[i] for i in idx])}


def _metrics(spec: RunSpec, predictions: list[str], references: list[list[str]],
             scorer: MeteorScorer | None) -> dict[str, float]:
    kw = {"include_meteor": scorer is not None, "meteor_scorer": scorer}
    if spec.data == "e2e":
        return metrics.e2e_metrics(predictions, references, **kw)
    return metrics.webnlg_metrics(predictions, references, data=spec.data, **kw)


def meteor_scorer() -> MeteorScorer | None:
    """A METEOR process, or None where Java cannot run it (METEOR is then left out)."""
    try:
        return MeteorScorer()
    except MeteorUnavailableError:
        return None


def score_sets(spec: RunSpec, sets: dict[str, EvalSet], predictions: dict[str, list[str]],
               scorer: MeteorScorer | bool | None = True) -> dict[str, dict]:
    """Metrics of each subset, and of their union as ``"all"`` when there are several (WebNLG seen + unseen).

    scorer: a METEOR process to use (callers scoring many runs pass one), None to leave METEOR out, or True
    for one started (and closed) here for all the subsets."""
    names = list(sets)
    if "all" not in sets:
        sets = {**sets, "all": ([], [r for n in names for r in sets[n][1]])}
        predictions = {**predictions, "all": [p for n in names for p in predictions[n]]}
    own = scorer is True
    meteor = meteor_scorer() if own else scorer
    try:
        return {name: _metrics(spec, predictions[name], refs, meteor) for name, (_, refs) in sets.items()}
    finally:
        if own and meteor is not None:
            meteor.close()


def _decode_and_score(model: Any, tokenizer: Any, spec: RunSpec, split: str, limit: int) -> dict[str, Any]:
    sets = eval_sets(spec, split, limit)
    beams = spec.beams if split == "test" else 1
    search = {"early_stopping": True} if beams > 1 else {}  # a beam ends once it holds `beams` finished outputs
    predictions = {name: generate_texts(model, tokenizer, sources, spec.data_spec().format,
                                        batch_size=20 if beams == 1 else 8, num_beams=beams,
                                        max_new_tokens=spec.max_new_tokens, progress=False, **search)
                   for name, (sources, _) in sets.items()}
    scores = score_sets(spec, sets, predictions)
    return {"metrics": scores["all"], "subsets": scores, "predictions": predictions,
            "sources": {name: sources for name, (sources, _) in sets.items()}}


def _last_epoch_loss(out: Path) -> float | None:
    """Mean logged training loss over the last epoch's worth of steps (by the log's own epoch counter)."""
    path = out / "log.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return None
    last = [r["loss"] for r in rows if r["epoch"] > rows[-1]["epoch"] - 1]
    return sum(last) / len(last)


def _train_other(spec: RunSpec, out: Path) -> tuple[Any, Any, int, int]:
    """PEFT or full fine-tuning with the library's training loop; (model, tokenizer, steps, stored bytes)."""
    model, tokenizer = load_causal_lm(MODEL)
    _, encoded, _ = prepare_data(GenerationTask(spec.data_spec()), tokenizer, spec.seed)
    torch.manual_seed(spec.seed)
    if spec.system == "peft":
        import peft

        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.prefix_length,
                                      prefix_projection=spec.reparam, encoder_hidden_size=spec.reparam_hidden)
        model = peft.get_peft_model(model, cfg)
    state = fit(model, encoded, out, spec.train_config(), tokenizer.pad_token_id, resume=True, progress=False,
                collate_fn=_right_pad)
    if spec.system == "peft":
        model.save_pretrained(str(out / "adapter"))
        stored = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    else:
        stored = 2 * sum(p.numel() for p in model.parameters())  # what a bf16 copy of the tuned model takes
    return model, tokenizer, state.step, stored


def run(spec: RunSpec, root: str | Path) -> dict[str, Any]:
    """Train (or resume), decode and score ``spec``; returns (and saves) its result row."""
    out = Path(root) / spec.key
    result_path = out / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    t0 = time.perf_counter()
    if spec.system == "prefixtune":
        summary = train_run(out, MODEL, GenerationTask(spec.data_spec()), spec.prefix_config(), spec.train_config(),
                            resume=True, progress=False)
        model, tokenizer, _, _ = load_trained(out)
        steps, trainable = summary["steps"], summary["trainable_parameters"]
        stored = (out / "best" / "prefix.safetensors").stat().st_size
    else:
        model, tokenizer, steps, stored = _train_other(spec, out)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    train_s = time.perf_counter() - t0
    test = _decode_and_score(model, tokenizer, spec, "test", spec.test_limit)
    dev = _decode_and_score(model, tokenizer, spec, "dev", spec.dev_limit) if spec.dev_limit else None
    result = {
        "key": spec.key,
        "spec": dataclasses.asdict(spec),
        "steps": steps,
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "train_loss_last_epoch": _last_epoch_loss(out),
        "trainable_parameters": trainable,
        "stored_bytes": stored,
        "test": test["metrics"],
        "dev": dev["metrics"] if dev else None,
        "example": next(iter(test["predictions"].values()))[0],
        "decoded": {"test": {k: test[k] for k in ("subsets", "predictions", "sources")}}
                   | ({"dev": {k: dev[k] for k in ("subsets", "predictions", "sources")}} if dev else {}),
    }
    for name, preds in test["predictions"].items():
        suffix = "" if name == "all" else f"-{name}"
        atomic_write_text(out / f"predictions-test{suffix}.txt", "\n".join(preds) + "\n")
    atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
    for state_file in out.glob("state-*.safetensors"):  # the resume state is dead weight once scored
        state_file.unlink()
    return result


CSV_FIELDS = (["experiment", "key"] + [f.name for f in dataclasses.fields(RunSpec)]
              + ["steps", "train_s", "wall_s", "train_loss_last_epoch", "trainable_parameters", "stored_bytes"]
              + [f"test_{m}" for m in METRICS] + [f"dev_{m}" for m in METRICS])


def csv_row(experiment: str, result: dict[str, Any]) -> dict[str, Any]:
    row = {"experiment": experiment, "key": result["key"], **result["spec"]}
    for name in ("steps", "train_s", "wall_s", "train_loss_last_epoch", "trainable_parameters", "stored_bytes"):
        row[name] = result[name]
    for m in METRICS:
        row[f"test_{m}"] = round(result["test"][m], 4)
        row[f"dev_{m}"] = round(result["dev"][m], 4) if result.get("dev") else ""
    return row


def write_csv(rows: list[dict[str, Any]], path: str | Path, fields: list[str] | None = None) -> None:
    """All rows, one per (experiment, run), written atomically; columns ``fields`` (default ``CSV_FIELDS``)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields or CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())
