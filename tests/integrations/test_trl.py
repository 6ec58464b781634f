"""A PrefixModel in TRL's SFTTrainer on a chat dataset with completion-only loss: the loss TRL's fused LM head
computes is the prefix model's own loss over the completion tokens, the prefix trains, only it is saved."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import char_tokenizer, tiny

from prefixtune.core.checkpoint import WEIGHTS_NAME
from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import attach, load

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from prefixtune.integrations.trainer import prefix_trainer  # noqa: E402

TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}a:{% endif %}")
ROWS = 8


def _chat() -> datasets.Dataset:
    rows = [{"prompt": [{"role": "user", "content": f"add {i} {i + 1}"}],
             "completion": [{"role": "assistant", "content": f"{2 * i + 1}"}]} for i in range(ROWS)]
    return datasets.Dataset.from_list(rows)


def test_sft_trainer_trains_the_prefix_on_completion_tokens_and_saves_only_it(tmp_path):
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=4, reparam=False, init_std=0.5))
    start = {k: v.clone() for k, v in pm.state_dict().items()}
    args = trl.SFTConfig(str(tmp_path), per_device_train_batch_size=ROWS, max_steps=2, save_steps=1,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, completion_only_loss=True,
                         disable_tqdm=True, seed=0, activation_checkpointing=True)
    trainer = prefix_trainer(trl.SFTTrainer)(model=pm, args=args, train_dataset=_chat(), processing_class=tok)

    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(ROWS)])
    for row, labels in zip(_chat(), batch["labels"], strict=True):  # the targets are the completion ("…\n")
        assert tok.decode(labels[labels != -100]) == row["completion"][0]["content"] + "\n"
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        reference = float(pm(**inputs).loss)
        with pm.disabled():
            bare = float(pm(**inputs).loss)
    assert abs(reference - bare) > 1e-3  # so that matching `reference` shows the prefix was applied

    trainer.train()
    assert pm.base.is_activation_checkpointing  # Trainer called PrefixModel.activation_checkpointing_enable
    first = next(r for r in trainer.state.log_history if "loss" in r)
    assert first["loss"] == pytest.approx(reference, rel=1e-4)  # the whole data set is the first batch
    assert any(not torch.equal(start[k], v) for k, v in pm.state_dict().items()), "the prefix did not train"
    for ckpt in ("checkpoint-1", "checkpoint-2"):
        assert set(load_file(tmp_path / ckpt / "model.safetensors")) == set(start)
        assert set(load_file(tmp_path / ckpt / WEIGHTS_NAME)) == set(pm.trainable_state_dict())
    loaded = load(tmp_path / "checkpoint-2", tiny("llama"))
    for key, value in pm.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.detach())
