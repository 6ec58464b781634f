"""The command line on a tiny local model and a tiny JSONL dataset (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import save_tiny_model_dir

from prefixtune.cli import build_parser, main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "toy.jsonl"
    rows = [{"source": f"name : {n} | food : {f}", "target": f"{n} serves {f}."}
            for n in ("Aro", "Bib", "Cot", "Dax") for f in ("fish", "rice", "tea")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


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


def test_train_eval_generate_score(tiny_dir, jsonl, tmp_path, capsys):
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


def _tiny_bert_dir(path):
    """A tiny BERT and a WordPiece tokenizer with [CLS]/[SEP] and segment ids, saved as a model folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "great", "awful", "film", "plot", "a", "the"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(path)
    return str(path)


def test_classify_train_and_eval(tmp_path, capsys):
    model_dir = _tiny_bert_dir(tmp_path)
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
