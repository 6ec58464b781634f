"""Run records (run.json): typed, validated on load, unknown fields refused naming the file; records written by
the code before the re-layout still load; one data fingerprint, equal to the one generation runs always had."""

from __future__ import annotations

import hashlib
import json

import pytest

from prefixtune.core.config import PrefixConfig
from prefixtune.errors import ConfigError
from prefixtune.tasks.classification import ClassificationTask, ClassifySpec
from prefixtune.tasks.generation import DataSpec, GenerationTask
from prefixtune.tasks.readers import Example
from prefixtune.training.loop import TrainConfig
from prefixtune.training.runs import FILES, RunRecord, check_resume, data_fingerprint, locate_run

# run.json as the code before the re-layout wrote it for a generation run (no "task", no "labels")
OLD_GENERATION = {
    "model": {"name": "smollm2-135m"},
    "data": {"data": "e2e", "split": "train", "dev_split": "dev", "dev_limit": 200, "train_limit": 300,
             "source_field": None, "target_field": None, "max_length": 256, "on_too_long": "error",
             "separator": "\n", "target_prefix": " "},
    "prefix": {"prefix_length": 10, "reparam": True, "reparam_hidden": 512, "mode": "prefix", "encoder_prefix": True,
               "decoder_prefix": True, "cross_prefix": True, "dropout": 0.0, "init": "random", "init_std": 0.02},
    "train": {"epochs": 1.0, "max_steps": None, "batch_size": 8, "grad_accum": 1, "lr": 0.0005, "warmup_steps": 5,
              "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": 42, "precision": "fp32",
              "gradient_checkpointing": False, "eval_every": None, "early_stopping": None, "log_every": 5,
              "checkpoint_every": 20},
    "data_fingerprint": "ab" * 32,
    "num_train_examples": 300,
    "distributed": {"world_size": 1, "global_batch_size": 8, "effective_batch_size": 8, "fsdp": False},
    "versions": {"prefixtune": "0.1.0", "python": "3.11.9", "torch": "2.13.0", "transformers": "5.23.0",
                 "safetensors": "0.7.0"},
    "argv": ["prefixtune", "demo"],
    "trainable_parameters": 1234,
}
OLD_CLASSIFICATION = {
    "task": "classify", "model": {"name": "minilm-l6"},
    "data": {"data": "sst2", "split": "train", "dev_split": "dev", "train_limit": 4000, "text_field": None,
             "text_pair_field": None, "label_field": None, "max_length": 128},
    "labels": ["0", "1"], "prefix": {**OLD_GENERATION["prefix"], "reparam": False},
    "train": OLD_GENERATION["train"], "data_fingerprint": "cd" * 32, "num_train_examples": 4000,
    "distributed": OLD_GENERATION["distributed"], "versions": OLD_GENERATION["versions"], "argv": [],
    "trainable_parameters": 99,
}


def _write(tmp_path, record: dict):
    path = tmp_path / FILES.record
    path.write_text(json.dumps(record))
    return path


def test_run_json_written_before_the_relayout_loads_as_its_task(tmp_path):
    gen = RunRecord.read(_write(tmp_path, OLD_GENERATION))
    assert gen.task == "generate" and gen.labels is None and gen.global_batch == 8
    assert isinstance(gen.make_task(), GenerationTask) and gen.make_task().spec == DataSpec(train_limit=300)
    assert gen.prefix == PrefixConfig() and gen.train == TrainConfig(epochs=1.0, batch_size=8, warmup_steps=5,
                                                                      log_every=5)
    cls = RunRecord.read(_write(tmp_path, OLD_CLASSIFICATION))
    task = cls.make_task(data="rte")
    assert isinstance(task, ClassificationTask) and task.labels == ("0", "1") and task.spec.data == "rte"
    # records from before ranks existed: one rank, the global batch is the batch size
    no_ranks = {k: v for k, v in OLD_GENERATION.items() if k not in ("distributed", "trainable_parameters")}
    assert RunRecord.read(_write(tmp_path, no_ranks)).global_batch == 8


def test_run_record_round_trips_through_run_json(tmp_path):
    record = RunRecord.from_dict(OLD_CLASSIFICATION, "x")
    record.write(tmp_path / FILES.record)
    assert RunRecord.read(tmp_path / FILES.record) == record
    written = json.loads((tmp_path / FILES.record).read_text())
    # fields added since are written at their defaults; everything else is as it was
    added = {"data": {"pooling": "cls"}, "train": {"group_by_length": False}}
    for section, fields in added.items():
        assert {k: v for k, v in written[section].items() if k not in OLD_CLASSIFICATION[section]} == fields
        written[section] = {k: v for k, v in written[section].items() if k not in fields}
    assert written == OLD_CLASSIFICATION


@pytest.mark.parametrize(("change", "expected"), [
    ({"optimizer": "adam"}, "unknown field 'optimizer'"),
    ({"data": {**OLD_GENERATION["data"], "shuffle": True}}, "field 'data': unknown field 'shuffle'"),
    ({"train": {**OLD_GENERATION["train"], "lr": -1}}, "field 'train': TrainConfig: invalid lr=-1"),
    ({"prefix": {**OLD_GENERATION["prefix"], "length": 3}}, "field 'prefix': unknown field 'length'"),
    ({"data": {**OLD_GENERATION["data"], "max_length": 0}}, "DataSpec: invalid max_length=0"),
    ({"task": "translate"}, "task='translate'"),
    ({"task": "classify", "data": OLD_CLASSIFICATION["data"]}, "needs its 'labels'"),
])
def test_run_json_with_unknown_or_bad_fields_is_refused_naming_the_file_and_field(tmp_path, change, expected):
    path = _write(tmp_path, {**OLD_GENERATION, **change})
    with pytest.raises(ConfigError) as exc:
        RunRecord.read(path)
    assert str(path) in str(exc.value) and expected in str(exc.value)


def test_locate_run_prefers_best_and_reports_a_missing_record(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a prefixtune run directory"):
        locate_run(tmp_path)
    _write(tmp_path, OLD_GENERATION)
    (tmp_path / FILES.best).mkdir()
    (tmp_path / FILES.best / "prefix_config.json").write_text("{}")
    prefix_dir, record = locate_run(tmp_path)
    assert prefix_dir == tmp_path / FILES.best and record.model_name == "smollm2-135m"


def test_check_resume_names_each_changed_setting_and_allows_the_resumable_ones(tmp_path):
    saved = RunRecord.from_dict(OLD_GENERATION, "saved")
    same = RunRecord.from_dict({**OLD_GENERATION, "train": {**OLD_GENERATION["train"], "max_steps": 50}}, "now")
    check_resume(saved, same, tmp_path)  # max_steps may change: it does not change what a step computes
    changed = RunRecord.from_dict({**OLD_GENERATION, "train": {**OLD_GENERATION["train"], "seed": 5},
                                   "data_fingerprint": "00" * 32}, "now")
    with pytest.raises(ConfigError, match=r"train\.seed: saved 42, now 5; the training examples differ"):
        check_resume(saved, changed, tmp_path)


def test_data_fingerprint_of_generation_records_equals_the_formula_saved_runs_hold():
    examples = [Example("name : A", "A is here.", "f:1"), Example("name : B", "B, too.", "f:2")]
    old = hashlib.sha256()
    for ex in examples:  # what run.json's data_fingerprint always was for generation runs (resume compares it)
        old.update(ex.source.encode() + b"\0" + ex.target.encode() + b"\n")
    assert data_fingerprint(GenerationTask(DataSpec()).fingerprint_rows(examples)) == old.hexdigest()


@pytest.mark.parametrize(("cls", "kwargs", "expected"), [
    (DataSpec, {"max_length": 0}, "max_length=0"),
    (DataSpec, {"on_too_long": "cut"}, "on_too_long='cut'"),
    (DataSpec, {"dev_limit": 0}, "dev_limit=0"),
    (DataSpec, {"separator": ""}, "separator=''"),
    (DataSpec, {"data": ""}, "data=''"),
    (ClassifySpec, {"train_limit": -1}, "train_limit=-1"),
    (ClassifySpec, {"label_field": ""}, "label_field=''"),
])
def test_data_specs_refuse_invalid_fields_naming_them(cls, kwargs, expected):
    with pytest.raises(ConfigError, match=f"{cls.__name__}: invalid .*{expected}".replace("(", r"\(")):
        cls(**kwargs)
