"""The command line on a tiny local model and a tiny JSONL dataset (no downloads)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from tiny_models import save_tiny_bert_dir, save_tiny_model_dir

from prefixtune.cli import build_parser, flag_of, main, train_settings
from prefixtune.core.config import PrefixConfig
from prefixtune.serving.engine import EngineConfig
from prefixtune.tasks.classification import ClassifySpec
from prefixtune.tasks.generation import DataSpec
from prefixtune.tasks.metrics import java_meteor
from prefixtune.tasks.rows import resolve_data_root
from prefixtune.tasks.task import DecodeConfig
from prefixtune.training.loop import TrainConfig

needs_data = pytest.mark.skipif(not (resolve_data_root() / "e2e").is_dir(), reason="shared E2E data not found")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


def _train_args(tiny_dir, jsonl, out, *extra):
    return ["train", "--model", tiny_dir, "--data", str(jsonl), "--out", str(out), "--dev-split", "none",
            "--epochs", "2", "--batch-size", "4", "--prefix-length", "3", "--reparam-hidden", "16", "--lr", "1e-2",
            *extra]


@pytest.mark.parametrize("command", ["train", "eval", "score", "generate", "demo", "serve"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    assert "usage: prefixtune " + command in capsys.readouterr().out


def test_train_eval_generate_score_on_a_tiny_model_refusing_overwrite_and_changed_resume(
        tiny_dir, jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_dir, jsonl, out)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["stopped"] == "finished"
    for name in ("run.json", "log.jsonl", "loss.png", "best/prefix.safetensors", "best/prefix_config.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "run.json").read_text())
    assert record["prefix"]["prefix_length"] == 3 and record["train"]["lr"] == 1e-2
    assert {"torch", "transformers", "prefixtune"} <= set(record["versions"]) and record["data_fingerprint"]

    # a second run into the same directory is refused instead of overwriting it
    assert main(_train_args(tiny_dir, jsonl, out)) == 2
    assert "already holds a run" in capsys.readouterr().err
    # resuming with other settings is refused, naming the field
    assert main(_train_args(tiny_dir, jsonl, out, "--resume", "--seed", "5")) == 2
    assert "train.seed: saved 42, now 5" in capsys.readouterr().err

    preds = tmp_path / "preds.txt"
    assert main(["eval", str(out), "--data", str(jsonl), "--split", "all", "--predictions", str(preds),
                 "--max-new-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sources"] == 12 and len(preds.read_text().splitlines()) == 12
    assert json.loads((tmp_path / "preds.txt.metrics.json").read_text())["BLEU"] == result["BLEU"]

    assert main(["score", "--data", str(jsonl), "--split", "all", "--predictions", str(preds)]) == 0
    assert json.loads(capsys.readouterr().out)["BLEU"] == result["BLEU"]
    preds.write_text("only one line\n")
    assert main(["score", "--data", str(jsonl), "--split", "all", "--predictions", str(preds)]) == 2
    assert "1 predictions, but" in capsys.readouterr().err

    assert main(["generate", str(out), "name : Aro | food : tea", "--max-new-tokens", "6"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_bad_data_is_reported_with_file_line_and_field(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "c"}\n')
    assert main(_train_args(tiny_dir, bad, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "target" in err
    assert not (tmp_path / "run" / "trainer_state.json").exists()


def test_classify_train_then_eval_reproduces_the_dev_accuracy(tmp_path, capsys):
    model_dir = save_tiny_bert_dir(tmp_path)
    rows = [("a good film", "pos"), ("a great plot", "pos"), ("the awful film", "neg"), ("a bad plot", "neg")] * 4
    data = tmp_path / "toy.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    out = tmp_path / "run"
    assert main(["train", "--task", "classify", "--model", model_dir, "--data", str(data), "--dev-split", "x",
                 "--out", str(out), "--prefix-length", "2", "--no-reparam", "--epochs", "20", "--batch-size", "8",
                 "--lr", "1e-2", "--eval-every", "10"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 40 and set(summary["dev"]) == {"accuracy", "macro_f1", "mcc"}
    record = json.loads((out / "best" / "run.json").read_text())
    assert record["task"] == "classify" and record["labels"] == ["neg", "pos"]
    assert main(["eval", str(out), "--split", "x", "--predictions", str(tmp_path / "p.txt")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 16 and result["accuracy"] == summary["dev"]["accuracy"]
    assert set((tmp_path / "p.txt").read_text().split()) <= {"pos", "neg"}


# ----------------------------------------------------------------------------- flags from the dataclasses


def _settings(*argv):
    return train_settings(build_parser().parse_args(["train", *argv]))


def test_train_flags_are_generated_from_every_config_field_with_its_default(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for cls in (PrefixConfig, TrainConfig, DataSpec, ClassifySpec):
        for f in dataclasses.fields(cls):
            flag = flag_of(cls, f.name)
            flag = "--no-" + flag[2:] if f.default is True else flag
            assert flag + " " in help_text, (cls.__name__, f.name)
    assert f"--epochs EPOCHS passes over the training examples (fractions allowed). (default: {TrainConfig().epochs})" \
        in help_text
    # no flag given: exactly the dataclasses' defaults (each written once, there)
    settings = _settings("--out", "x")
    assert settings["prefix"] == PrefixConfig() and settings["train"] == TrainConfig()
    assert settings["task"].spec == DataSpec() and settings["model_name"] == "smollm2-135m"
    assert _settings("--out", "x", "--task", "classify")["task"].spec == ClassifySpec()
    # today's flag names set their fields; 'none' is None for optional fields
    s = _settings("--out", "x", "--no-reparam", "--prefix-dropout", "0.1", "--dev-split", "none", "--grad-accum", "2")
    assert (s["prefix"].reparam, s["prefix"].dropout, s["task"].spec.dev_split, s["train"].grad_accum) == (
        False, 0.1, None, 2)
    assert _settings("--out", "x", "--task", "classify", "--source-field", "s")["task"].spec.text_field == "s"


def test_serve_and_eval_flags_show_the_engine_server_and_decode_defaults(capsys):
    from prefixtune.server.app import ServerConfig

    for command, cls, name in (("serve", EngineConfig, "max_batch_size"), ("serve", EngineConfig, "max_waiting"),
                               ("serve", ServerConfig, "max_tokens"), ("eval", DecodeConfig, "max_new_tokens")):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, *(["run"] if command == "eval" else []), "--help"])
        text = " ".join(capsys.readouterr().out.split())
        default = getattr(cls(), name)
        assert f"{flag_of(cls, name)} {name.upper()} " in text and f"(default: {default})" in text, (command, name)


def test_a_help_text_whose_continuation_line_has_a_colon_is_read_whole():
    """``prefill``'s docstring continues with '... where it does not: in groups ...' (once cut there)."""
    from prefixtune.cli import field_help

    helps = field_help(EngineConfig)
    assert helps["prefill"].endswith("as ``max_prefill_padding`` describes.")
    assert helps["prefill_chunk"].endswith("None: every prompt in one forward.")
    assert "where it does not" not in helps and "go on decoding" not in helps


def test_config_yaml_reads_the_same_dataclasses_and_flags_override_it(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("task: generate\nmodel: my-model\nout: runs/a\n"
                      "data: {data: toy.jsonl, dev_split: null, max_length: 64}\n"
                      "prefix: {prefix_length: 4, reparam: false}\ntrain: {epochs: 2, lr: 0.01}\n")
    s = _settings("--config", str(config), "--lr", "0.02", "--out", "runs/b")
    assert s["model_name"] == "my-model" and s["out_dir"] == "runs/b"
    assert s["task"].spec == DataSpec(data="toy.jsonl", dev_split=None, max_length=64)
    assert s["prefix"] == PrefixConfig(prefix_length=4, reparam=False)
    assert s["train"] == TrainConfig(epochs=2, lr=0.02)


def test_config_yaml_numbers_written_as_yaml_strings_become_numbers(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("out: r\ntrain: {lr: 5e-4, max_steps: none}\n")  # YAML 1.1 reads 5e-4 as a string
    assert _settings("--config", str(config))["train"] == TrainConfig(lr=5e-4, max_steps=None)


@pytest.mark.parametrize(("content", "expected"), [
    ("optimizer: adam\n", "unknown key 'optimizer'"),
    ("train: {learning_rate: 0.1}\n", "section 'train': unknown field 'learning_rate'"),
    ("train: {lr: -1}\n", "section 'train': TrainConfig: invalid lr=-1"),
    ("data: [e2e]\n", "section 'data': expected a mapping"),
    ("train: {lr: [0.1\n", "not valid YAML"),
    ("train: {lr: fast}\n", "section 'train': field 'lr': expected a number, got 'fast'"),
])
def test_config_yaml_errors_name_the_file_and_the_key_in_one_line(tmp_path, capsys, content, expected):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_a_flag_of_the_other_task_and_a_missing_out_are_refused_in_one_line(capsys):
    assert main(["train", "--task", "classify", "--on-too-long", "skip", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "prefixtune train: error: --on-too-long: does not apply to --task classify"
    assert main(["train"]) == 2
    assert "--out is required" in capsys.readouterr().err


# ----------------------------------------------------------------------------- errors reach the CLI as one line


@needs_data
def test_score_without_java_leaves_meteor_out_alike_for_e2e_and_other_data(jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(java_meteor.shutil, "which", lambda name: None)  # no Java on this machine
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    e2e_preds, toy_preds = tmp_path / "e2e.txt", tmp_path / "toy.txt"
    e2e_preds.write_text("The Vaults is a pub.\n" * 5)
    toy_preds.write_text("".join(r["target"] + "\n" for r in rows))
    results = {}
    for name, args in (("e2e", ["--data", "e2e", "--limit", "5", "--predictions", str(e2e_preds)]),
                       ("toy", ["--data", str(jsonl), "--split", "all", "--predictions", str(toy_preds)])):
        assert main(["score", *args]) == 0, name
        out, err = capsys.readouterr()
        results[name] = json.loads(out)
        assert results[name]["METEOR"] is None, name
        assert err.strip().startswith("note: METEOR left out") and len(err.strip().splitlines()) == 1, err
    assert set(results["e2e"]) >= {"BLEU", "NIST", "ROUGE_L", "CIDEr"} and results["toy"]["BLEU"] == pytest.approx(100)


def test_user_errors_end_in_one_line_without_a_traceback(tmp_path, capsys):
    missing = tmp_path / "nothing.txt"
    cases = [
        (["score", "--data", "e2e", "--predictions", str(missing)], str(missing)),  # FileNotFoundError
        (["eval", str(tmp_path)], "is not a prefixtune run directory"),
        (["score", "--data", "unknown-set", "--predictions", str(missing)], "unknown data 'unknown-set'"),
        (["train", "--out", str(tmp_path / "r"), "--epochs", "0"], "TrainConfig: invalid epochs=0.0"),
        (["train", "--out", str(tmp_path / "r"), "--max-length", "0"], "DataSpec: invalid max_length=0"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (argv, err)
