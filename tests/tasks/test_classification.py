"""The classification task: a head parameter chooses what trains with the prefix (no module table to swap), and
its score of label names equals the metrics of their class ids; the mean-pooling head type pools the real tokens
only, matches a reference computation, saves and loads with the prefix, and is recorded with the run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import save_tiny_bert_dir
from transformers import BertConfig, BertForSequenceClassification, BertModel

from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import load
from prefixtune.errors import ConfigError
from prefixtune.files import dataclass_from_dict
from prefixtune.tasks.classification import (
    HEADS,
    POOLINGS,
    ClassificationTask,
    ClassifySpec,
    EncodedClass,
    MeanPoolingClassifier,
    attach_classifier,
    collate_classes,
    encode_examples,
    head_modules,
    load_classifier_base,
    masked_mean,
)
from prefixtune.tasks.metrics import classification_metrics
from prefixtune.tasks.task import DecodeConfig
from prefixtune.training.loop import TrainConfig
from prefixtune.training.pipeline import load_trained, train_run


def _tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2))


def _trained_modules(task: ClassificationTask) -> set[str]:
    pm = task.attach(_tiny_bert(), PrefixConfig(prefix_length=2, reparam=False), None)
    return {n.split(".weight")[0].split(".bias")[0] for n, p in pm.base.named_parameters() if p.requires_grad}


def test_the_head_parameter_chooses_what_trains_with_the_prefix_and_leaves_the_default_alone():
    default = _trained_modules(ClassificationTask(ClassifySpec(), labels=["a", "b"]))
    pooled = _trained_modules(ClassificationTask(ClassifySpec(), labels=["a", "b"], head=("bert.pooler", "classifier")))
    assert default == {"classifier"}
    assert pooled == {"bert.pooler.dense", "classifier"}
    assert "bert" not in HEADS  # nothing global changed
    assert _trained_modules(ClassificationTask(ClassifySpec(), labels=["a", "b"])) == default


def test_score_of_label_names_equals_the_metrics_of_their_class_ids():
    task = ClassificationTask(ClassifySpec(), labels=["neg", "pos", "mixed"])
    predictions, references = ["pos", "neg", "pos", "mixed"], ["pos", "pos", "pos", "neg"]
    assert task.score(predictions, references) == classification_metrics([1, 0, 1, 2], [1, 1, 1, 0])


# ----------------------------------------------------------------------------- the mean-pooling head


def _tiny_mean_classifier(seed: int = 0, num_labels: int = 3) -> MeanPoolingClassifier:
    torch.manual_seed(seed)
    encoder = BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32))
    return MeanPoolingClassifier(encoder, num_labels).eval()


def test_masked_mean_is_the_mean_over_real_tokens_whatever_the_padding_holds():
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1],    # no padding
                         [1, 1, 1, 0, 0],    # right-padded
                         [0, 0, 0, 1, 1]])   # left-padded
    expected = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0), hidden[2, 3:].mean(0)])
    assert torch.allclose(masked_mean(hidden, mask), expected, atol=1e-6)
    garbage = hidden.clone()
    garbage[mask == 0] = float("nan")  # what padding holds changes nothing, not even through 0 * NaN
    assert torch.equal(masked_mean(garbage, mask), masked_mean(hidden, mask))
    assert torch.allclose(masked_mean(hidden, None), hidden.mean(1))


def test_mean_pooling_logits_match_a_reference_and_padding_changes_nothing():
    model = _tiny_mean_classifier()
    rows = [[2, 7, 8, 9, 3], [2, 5, 3], [2, 11, 12, 3]]
    batch = collate_classes([EncodedClass(r, None, 0) for r in rows], pad_id=0)  # right-padded to 5
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    w, b = model.classifier.weight, model.classifier.bias
    with torch.no_grad():
        for i, row in enumerate(rows):  # each row alone, unpadded: mean of its hidden states, then the linear map
            hidden = model.encoder(input_ids=torch.tensor([row])).last_hidden_state[0]
            assert torch.allclose(logits[i], hidden.mean(0) @ w.T + b, atol=1e-5), i
            assert not torch.allclose(logits[i], hidden[0] @ w.T + b, atol=1e-3)  # not the first token's vector
    out = model(**batch)  # labels -> the mean cross-entropy of those logits
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, batch["labels"]))


def test_mean_pooling_under_a_prefix_reads_the_real_tokens_only_and_padding_changes_nothing():
    pm = attach_classifier(_tiny_mean_classifier(), PrefixConfig(prefix_length=4, reparam=False, init_std=1.0))
    pm.eval()
    assert pm.train_modules == ("classifier",)
    rows = [[2, 7, 8, 9, 3, 6], [2, 5, 3], [2, 11, 12, 3]]
    batch = collate_classes([EncodedClass(r, None, 0) for r in rows], pad_id=0)
    batch.pop("labels")
    with torch.no_grad():
        logits = pm(**batch).logits
        alone = torch.cat([pm(input_ids=torch.tensor([r])).logits for r in rows])
        with pm.disabled():
            bare = pm(**batch).logits
    assert torch.allclose(logits, alone, atol=1e-5)
    assert not torch.allclose(logits, bare, atol=1e-3)  # the prefix reaches the pooled states


def test_mean_pooling_head_saves_and_loads_with_the_prefix_to_identical_logits(tmp_path):
    pm = attach_classifier(_tiny_mean_classifier(), PrefixConfig(prefix_length=3, reparam=False, init_std=1.0))
    with torch.no_grad():  # a head that is not the fresh one, so the test fails if the head were not saved
        pm.base.classifier.weight.add_(torch.randn_like(pm.base.classifier.weight))
    pm.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefix.safetensors", "prefix_config.json"]
    with safe_open(str(tmp_path / "prefix.safetensors"), "pt") as f:
        assert {"module.classifier.weight", "module.classifier.bias"} <= set(f.keys())
    assert json.loads((tmp_path / "prefix_config.json").read_text())["train_modules"] == ["classifier"]
    fresh = _tiny_mean_classifier(seed=0)  # same encoder, a new classifier...
    torch.manual_seed(5)
    torch.nn.init.normal_(fresh.classifier.weight)  # ...that differs
    loaded = load(tmp_path, fresh).eval()
    ids = torch.tensor([[2, 7, 8, 3], [2, 5, 3, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits,
                           pm.eval()(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(ValueError, match=r"different base model \(MeanPoolingClassifier\)"):  # not on a CLS model
        load(tmp_path, _tiny_bert())


def test_a_run_with_the_mean_head_records_it_and_loads_back_to_the_same_logits(tmp_path, one_thread):
    model_dir = save_tiny_bert_dir(tmp_path / "model")
    data = tmp_path / "toy.tsv"
    rows = [("a good film", "pos"), ("a great plot", "pos"), ("the awful film", "neg"), ("a bad plot", "neg")] * 2
    data.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    task = ClassificationTask(ClassifySpec(data=str(data), dev_split=None, pooling="mean"))
    train_run(tmp_path / "run", model_dir, task, PrefixConfig(prefix_length=2, reparam=False),
              TrainConfig(epochs=2, batch_size=4, lr=1e-2, warmup_steps=0, eval_every=None), progress=False)
    pm, tokenizer, record, loaded_task = load_trained(tmp_path / "run")
    assert record.data.pooling == "mean" and isinstance(pm.base, MeanPoolingClassifier)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"]["pooling"] == "mean"
    examples = loaded_task.read("train")
    assert loaded_task.predict(pm, tokenizer, examples, DecodeConfig()) == task.predict(
        pm, tokenizer, examples, DecodeConfig())
    batch = collate_classes(encode_examples(tokenizer, examples), task.pad_id(tokenizer))
    batch.pop("labels")
    again, _, _, _ = load_trained(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(pm.eval()(**batch).logits, again.eval()(**batch).logits)
        assert torch.equal(pm.base.classifier.weight, again.base.classifier.weight)
    assert not torch.equal(pm.base.classifier.weight, load_classifier_base(model_dir, 2, "mean")[0].classifier.weight)


def test_the_mean_head_trains_only_its_classifier_whatever_the_architecture_table_says():
    model = _tiny_mean_classifier()
    assert head_modules(model) == ("classifier",)
    model.config.model_type = "distilbert"  # HEADS' entry for it names modules a MeanPoolingClassifier lacks
    assert head_modules(model) == ("classifier",)
    assert head_modules(model, ("classifier", "dropout")) == ("classifier", "dropout")


def test_a_bad_head_type_fails_naming_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"ClassifySpec: invalid pooling='max' \(one of \['cls', 'mean'\]\)"):
        ClassifySpec(pooling="max")
    with pytest.raises(ConfigError, match=r"run.json: data: .*pooling='max'"):
        dataclass_from_dict(ClassifySpec, {"pooling": "max"}, "run.json: data")
    with pytest.raises(ConfigError, match=r"load_classifier_base\('no-such-model'\): invalid pooling='max'"):
        load_classifier_base("no-such-model", 2, "max")  # refused before any model is looked for
    assert ClassifySpec().pooling == "cls" and POOLINGS == ("cls", "mean")
