"""Run directories: the typed run record (``run.json``), the data fingerprint, and the checks that keep a
resumed run computing what it started computing (the directory's file names: ``state.FILES``).

A run directory holds ``run.json`` (everything needed to reproduce the run: task, data, model, prefix and
training configs, seed, versions, data fingerprint), ``log.jsonl``, ``loss.png``, the resume state
(``trainer_state.json`` + ``state-<step>.safetensors``), and ``best/`` (the folded prefix,
``prefix_config.json`` + ``prefix.safetensors``, with a copy of ``run.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors
import torch
import transformers

from prefixtune.core.checkpoint import CONFIG_NAME
from prefixtune.core.config import PrefixConfig
from prefixtune.errors import ConfigError
from prefixtune.files import atomic_write_text, dataclass_from_dict
from prefixtune.tasks.classification import ClassificationTask, ClassifySpec
from prefixtune.tasks.generation import DataSpec, GenerationTask
from prefixtune.tasks.task import Task
from prefixtune.training.config import TrainConfig
from prefixtune.training.state import FILES

TASK_KINDS = ("generate", "classify")


def data_fingerprint(rows: Iterable[tuple[str, ...]]) -> str:
    """sha256 of the training records' content (``Task.fingerprint_rows``), fields joined by NUL, rows by LF."""
    h = hashlib.sha256()
    for row in rows:
        h.update("\0".join(row).encode() + b"\n")
    return h.hexdigest()


def versions() -> dict[str, str]:
    """The versions that reproduce a run."""
    return {"prefixtune": importlib.metadata.version("prefixtune"), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__}


@dataclass(frozen=True)
class RunRecord:
    """``run.json``: what a run trained, on what, with which settings. Validated on load; unknown fields
    (top level and in ``data`` / ``prefix`` / ``train``) are refused, naming the file and the field.

    Records written before the task field existed are generation runs; before ``distributed``, one rank.
    """

    model: dict[str, str]
    data: DataSpec | ClassifySpec
    prefix: PrefixConfig
    train: TrainConfig
    data_fingerprint: str
    num_train_examples: int
    task: Literal["generate", "classify"] = "generate"
    labels: tuple[str, ...] | None = None
    distributed: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    trainable_parameters: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASK_KINDS:
            raise ConfigError(f"task={self.task!r} (one of {list(TASK_KINDS)})")
        if not isinstance(self.model, dict) or not isinstance(self.model.get("name"), str):
            raise ConfigError(f"model={self.model!r} (a mapping with a 'name')")
        if self.task == "classify" and not self.labels:
            raise ConfigError("a classification run needs its 'labels'")

    @property
    def model_name(self) -> str:
        return self.model["name"]

    @property
    def global_batch(self) -> int:
        """Examples per accumulation micro-step over all ranks (runs written before ranks existed: one rank)."""
        return self.distributed.get("global_batch_size", self.train.batch_size)

    def make_task(self, data: str | None = None) -> Task:
        """The task this run trained, on its own data (or on ``data``, same fields and settings)."""
        spec = dataclasses.replace(self.data, data=data) if data else self.data
        if isinstance(spec, ClassifySpec):
            return ClassificationTask(spec, labels=self.labels)
        return GenerationTask(spec)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(data=dataclasses.asdict(self.data), prefix=self.prefix.to_dict(),
                   train=dataclasses.asdict(self.train), labels=list(self.labels) if self.labels else None)
        return out

    def write(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> RunRecord:
        """A checked record from a parsed ``run.json``; ``where`` (its path) names it in every error."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        raw = dict(raw)
        task = raw.get("task", "generate")
        spec_cls = ClassifySpec if task == "classify" else DataSpec
        for key, sub in (("data", spec_cls), ("prefix", PrefixConfig), ("train", TrainConfig)):
            if key in raw:
                raw[key] = dataclass_from_dict(sub, raw[key], f"{where}: field {key!r}")
        if raw.get("labels") is not None:
            raw["labels"] = tuple(raw["labels"])
        return dataclass_from_dict(cls, raw, where)

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        return cls.from_dict(raw, str(path))


def locate_run(run_dir: str | Path) -> tuple[Path, RunRecord]:
    """The saved-prefix folder of a run directory (its ``best/`` when there is one) and the run record."""
    path = Path(run_dir)
    best = path / FILES.best
    prefix_dir = best if (best / CONFIG_NAME).is_file() else path
    run_path = prefix_dir / FILES.record if (prefix_dir / FILES.record).is_file() else path / FILES.record
    if not run_path.is_file():
        raise FileNotFoundError(f"{run_path}: missing; {path} is not a prefixtune run directory")
    return prefix_dir, RunRecord.read(run_path)


# train fields a resumed run may change: they do not change what it computes (batch_size is per rank;
# the global batch is checked instead)
RESUMABLE_CHANGES = frozenset({"max_steps", "eval_every", "early_stopping", "log_every", "checkpoint_every",
                               "batch_size"})


def check_resume(saved: RunRecord, current: RunRecord, path: Path) -> None:
    """Refuse to resume a run with settings that would change what it computes, naming each difference."""
    diffs = []
    a_all, b_all = saved.to_dict(), current.to_dict()
    for section in ("model", "data", "prefix", "train"):
        a, b = a_all[section], b_all[section]
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in RESUMABLE_CHANGES:
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: saved {a.get(key)!r}, now {b.get(key)!r}")
    if saved.global_batch != current.global_batch:
        ranks = current.distributed["world_size"]
        diffs.append(f"global batch (--batch-size × ranks): saved {saved.global_batch}, now "
                     f"{current.train.batch_size} × {ranks} = {current.global_batch}")
    if current.data_fingerprint != saved.data_fingerprint:
        diffs.append("the training examples differ (data_fingerprint)")
    if diffs:
        raise ConfigError(f"{path}: --resume with other settings than the saved run: " + "; ".join(diffs))
