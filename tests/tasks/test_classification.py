"""The classification task: a head parameter chooses what trains with the prefix (no module table to swap), and
its score of label names equals the metrics of their class ids."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

from prefixtune.core.config import PrefixConfig
from prefixtune.tasks.classification import HEADS, ClassificationTask, ClassifySpec
from prefixtune.tasks.metrics import classification_metrics


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
