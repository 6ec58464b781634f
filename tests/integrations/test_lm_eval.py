"""lm-evaluation-harness on a prefix-tuned model, ``HFLM(pretrained=prefix_model, tokenizer=tok)``, over a local
YAML task and a local jsonl file: its log-likelihoods are the prefix model's own, and a trained prefix scores
higher than the bare base model."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_models import char_tokenizer, tiny

from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import PrefixModel, attach

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

DOCS = [{"q": f"{i}+{i}=", "choices": [str(2 * i + 1), str(2 * i)], "gold": 1} for i in range(5)]
TASK = """task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _task_dir(tmp_path):
    with open(tmp_path / "sums.jsonl", "w") as f:
        for doc in DOCS:
            f.write(json.dumps(doc) + "\n")
    (tmp_path / "tiny_sums.yaml").write_text(TASK.format(data=tmp_path / "sums.jsonl"))
    return str(tmp_path)


def _evaluate(model: torch.nn.Module, tok, task_dir: str) -> dict:
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=4)
    tasks = TaskManager(include_path=task_dir, include_defaults=False)  # indexing lm-eval's own tasks takes ~40 s
    return simple_evaluate(model=lm, tasks=["tiny_sums"], task_manager=tasks, bootstrap_iters=0, log_samples=True)


@torch.no_grad()
def _loglikelihood(model: torch.nn.Module, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(ctx) - 1 : -1].float(), -1)
    return float(logp.gather(-1, torch.tensor(cont)[:, None]).sum())


def _train_on_gold(pm: PrefixModel, tok, steps: int = 60) -> None:
    rows = [tok(d["q"] + " " + d["choices"][d["gold"]], add_special_tokens=False)["input_ids"] for d in DOCS]
    ids = torch.tensor(rows)  # equal lengths
    labels = ids.clone()
    labels[:, : ids.shape[1] - 2] = -100  # the " <answer>" tokens only
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    pm.train()
    for _ in range(steps):
        opt.zero_grad()
        pm(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    pm.eval()


@pytest.mark.usefixtures("one_thread")
def test_lm_eval_scores_the_prefix_model_with_its_own_loglikelihoods(tmp_path):
    tok = char_tokenizer()
    task_dir = _task_dir(tmp_path)
    bare = _evaluate(tiny("llama"), tok, task_dir)

    torch.manual_seed(0)
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=4, reparam=False))
    _train_on_gold(pm, tok)
    tuned = _evaluate(pm, tok, task_dir)

    for result, model in ((tuned, pm), (bare, tiny("llama"))):
        for sample in result["samples"]["tiny_sums"]:
            doc = sample["doc"]
            got = [r[0][0] for r in sample["resps"]]
            want = [_loglikelihood(model, tok, doc["q"], " " + c) for c in doc["choices"]]
            assert got == pytest.approx(want, abs=1e-4)
    assert tuned["results"]["tiny_sums"]["acc,none"] == 1.0
    assert bare["results"]["tiny_sums"]["acc,none"] < 1.0
