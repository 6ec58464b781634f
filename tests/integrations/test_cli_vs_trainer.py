"""One method, two front ends: ``prefixtune train`` (its own loop) and transformers' Trainer on the same data,
seed, batch order and schedule end on the same prefix.

The Trainer side is built the way ``training/pipeline.py`` builds the CLI's run (seed, then the model, the
encoded examples and the prefix) and is given the CLI's batches: the same collate (left padding) and the same
order of examples in each epoch (``training/loop.py``, ``_batches_of_epoch``). AdamW, the linear decay without
warmup, the gradient clipping at 1.0 and the loss (mean over the target tokens of a batch) are Trainer's own.
Two settings differ between the loops: Trainer's linear warmup gives step s the factor ``s / warmup`` (the first
step has lr 0) where prefixtune's gives ``(s + 1) / warmup``, and Trainer does not decay biases or norms where
prefixtune decays every trainable tensor. Without warmup and weight decay Trainer's own optimizer and schedule
give the CLI's prefix; with them, handing Trainer prefixtune's AdamW and schedule does (which shows that these
two are the whole difference).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_model_dir

from prefixtune.cli import build_parser, main, train_settings
from prefixtune.training import pipeline
from prefixtune.training.loop import _batches_of_epoch

transformers = pytest.importorskip("transformers")
from transformers import TrainingArguments  # noqa: E402

from prefixtune.integrations.trainer import PrefixTrainer  # noqa: E402

EPOCHS, BATCH, SEED, LR = 2, 4, 7, 1e-2


class _CliOrder(torch.utils.data.Sampler):
    """The CLI loop's example order: a fresh permutation each epoch (each pass over the data)."""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        batches = _batches_of_epoch(self.n, BATCH, SEED, self.epoch)
        self.epoch += 1
        return iter([i for batch in batches for i in batch])


class _CliBatches(PrefixTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return _CliOrder(len(train_dataset if train_dataset is not None else self.train_dataset))


def _prefixtune_optimizer(pm, lr: float, weight_decay: float, warmup: int, total: int):
    """AdamW over every trainable tensor and prefixtune's warmup ``(s + 1) / warmup`` then linear decay."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    factor = lambda s: (s + 1) / warmup if s < warmup else max(0.0, (total - s) / max(1, total - warmup))  # noqa: E731
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@pytest.mark.parametrize("warmup, decay", [(0, 0.0), (2, 0.1)], ids=["trainer-schedule", "warmup-and-decay"])
def test_cli_and_trainer_reach_the_same_prefix(tmp_path, jsonl, warmup, decay):
    model_dir = save_tiny_model_dir(tmp_path / "model")
    argv = ["train", "--model", model_dir, "--data", str(jsonl), "--out", str(tmp_path / "cli"), "--dev-split",
            "none", "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--prefix-length", "3",
            "--reparam-hidden", "16", "--lr", str(LR), "--seed", str(SEED), "--max-grad-norm", "1.0",
            "--warmup-steps", str(warmup), "--weight-decay", str(decay)]
    assert main(argv) == 0
    cli = load_file(tmp_path / "cli" / "best" / "prefix.safetensors")

    settings = train_settings(build_parser().parse_args(argv))  # the very objects the CLI trained with
    task, train = settings["task"], settings["train"]
    assert (train.warmup_steps, train.weight_decay, train.grad_accum) == (warmup, decay, 1)
    assert settings["prefix"].dropout == 0
    records = pipeline.training_records(task, train.seed)  # as pipeline.train_run: records, seed, model, prefix
    torch.manual_seed(train.seed)
    model, tokenizer = task.load_model(settings["model_name"])
    encoded, _ = pipeline.encode_data(task, tokenizer, records)
    pm = task.attach(model, settings["prefix"], tokenizer)
    pad_id = task.pad_id(tokenizer)
    with torch.no_grad():
        start = {f"{name}.table": stack().clone() for name, stack in pm.prefix.stacks.items()}
    total = train.total_steps(len(encoded))
    optimizers = _prefixtune_optimizer(pm, LR, decay, warmup, total) if warmup or decay else (None, None)

    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
                             learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=1.0, optim="adamw_torch", seed=SEED, save_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = _CliBatches(model=pm, args=args, train_dataset=encoded,
                          data_collator=lambda rows: task.collate(rows, pad_id), optimizers=optimizers)
    trainer.train()
    assert trainer.state.global_step == total == 6
    trainer.save_model(str(tmp_path / "hf" / "final"))
    hf = load_file(tmp_path / "hf" / "final" / "prefix.safetensors")

    with torch.no_grad():
        folded = {f"{name}.table": stack() for name, stack in pm.prefix.stacks.items()}
    assert set(cli) == set(folded)  # the CLI's best/ holds the folded prefix
    for key, value in cli.items():
        assert (value - start[key]).abs().max() > 1e-3  # it trained
        torch.testing.assert_close(folded[key], value, rtol=1e-5, atol=1e-6)
    assert set(hf) == set(pm.trainable_state_dict())
