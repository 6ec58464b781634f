"""A PrefixModel in transformers' Trainer: it trains and evaluates, every checkpoint holds the prefix only, the
base model is untouched, the best checkpoint is reloaded, a resumed run ends on the uninterrupted run's prefix,
and the saved folder loads with ``prefixtune.load`` (refused on another base model)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny

from prefixtune.core.checkpoint import WEIGHTS_NAME
from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import PrefixModel, attach, load

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from prefixtune.integrations.trainer import PrefixTrainer  # noqa: E402

STEPS = 6


def _data(n: int = 12, length: int = 10, seed: int = 0) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, 96, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * 4 + ids[4:]})
    return datasets.Dataset.from_list(rows)


def _model(config: PrefixConfig | None = None, train_modules: tuple[str, ...] = ()) -> PrefixModel:
    torch.manual_seed(0)
    config = config or PrefixConfig(prefix_length=3, reparam_hidden=16)
    return attach(tiny("llama"), config, train_modules=train_modules)


def _args(out: Path, **changes) -> TrainingArguments:
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=4,
                    max_steps=STEPS, learning_rate=5e-2, warmup_steps=1, weight_decay=0.01, max_grad_norm=1.0,
                    save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2, logging_steps=1,
                    report_to=[], use_cpu=True, seed=3, dataloader_num_workers=0, disable_tqdm=True)
    settings.update(changes)
    return TrainingArguments(**settings)


def _reference_loss(pm: PrefixModel, data: datasets.Dataset) -> float:
    """Mean over the target tokens of the whole set (rows have the same length and target count)."""
    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    was = pm.training
    pm.eval()
    with torch.no_grad():
        loss = float(pm(**batch).loss)
    pm.train(was)
    return loss


def test_trainer_checkpoints_hold_only_the_prefix_and_leave_the_base_unchanged(tmp_path):
    pm = _model()
    base_before = copy.deepcopy(pm.base.state_dict())
    prefix_before = {k: v.clone() for k, v in pm.state_dict().items()}
    trainer = PrefixTrainer(model=pm, args=_args(tmp_path), train_dataset=_data(), eval_dataset=_data(4, seed=1))
    trainer.train()

    expected = set(prefix_before)
    assert expected == {k for k, p in pm.named_parameters() if p.requires_grad}
    assert all(k.startswith("prefix.") for k in expected)
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for ckpt in checkpoints:
        assert set(load_file(ckpt / "model.safetensors")) == expected
        assert set(load_file(ckpt / WEIGHTS_NAME)) == set(pm.trainable_state_dict())
    last = load_file(checkpoints[-1] / "model.safetensors")
    for key, value in pm.state_dict().items():
        torch.testing.assert_close(last[key], value.detach(), rtol=0, atol=0)
    assert any(not torch.equal(prefix_before[k], v) for k, v in pm.state_dict().items()), "the prefix did not train"
    for key, value in pm.base.state_dict().items():
        assert torch.equal(value, base_before[key]), f"base weight {key} changed"

    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(_reference_loss(pm, _data(4, seed=1)), rel=1e-5)


def test_trainer_reloads_the_best_checkpoint_at_the_end(tmp_path):
    pm = _model()
    # "best" = the highest eval loss, i.e. an early checkpoint, so that reloading it is visible
    args = _args(tmp_path, load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=True)
    trainer = PrefixTrainer(model=pm, args=args, train_dataset=_data(), eval_dataset=_data(4, seed=1))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != f"checkpoint-{STEPS}"
    saved_best = load_file(best / "model.safetensors")
    saved_last = load_file(tmp_path / f"checkpoint-{STEPS}" / "model.safetensors")
    assert any(not torch.equal(saved_best[k], saved_last[k]) for k in saved_best)
    for key, value in pm.state_dict().items():
        assert torch.equal(value.detach(), saved_best[key]), f"{key} is not the best checkpoint's"


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def test_trainer_resume_reaches_the_uninterrupted_runs_prefix(tmp_path):
    full = _model(PrefixConfig(prefix_length=3, reparam_hidden=16, dropout=0.1))
    PrefixTrainer(model=full, args=_args(tmp_path / "full", eval_strategy="no"), train_dataset=_data()).train()

    cut = _model(PrefixConfig(prefix_length=3, reparam_hidden=16, dropout=0.1))
    args = _args(tmp_path / "cut", eval_strategy="no")
    PrefixTrainer(model=cut, args=args, train_dataset=_data(), callbacks=[_StopAt(3)]).train()
    assert (tmp_path / "cut" / "checkpoint-2").is_dir() and not (tmp_path / "cut" / "checkpoint-4").exists()

    fresh = _model(PrefixConfig(prefix_length=3, reparam_hidden=16, dropout=0.1, init_std=0.5))  # other init
    resumed = PrefixTrainer(model=fresh, args=args, train_dataset=_data())
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert resumed.state.global_step == STEPS
    for key, value in full.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=1e-6)


def test_saved_model_loads_with_prefixtune_load_and_is_refused_on_another_base(tmp_path):
    pm = _model(train_modules=("lm_head",))
    trainer = PrefixTrainer(model=pm, args=_args(tmp_path, max_steps=2, eval_strategy="no"), train_dataset=_data())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert set(load_file(tmp_path / "final" / "model.safetensors")) == set(pm.state_dict())
    assert {k.split(".")[0] for k in pm.state_dict()} == {"prefix", "base"}  # the trained head is saved too

    batch = {k: torch.tensor(_data(2, seed=5)[k]) for k in ("input_ids", "attention_mask")}
    pm.eval()
    with torch.no_grad():
        expected = pm(**batch).logits
    loaded = load(tmp_path / "final", tiny("llama"))
    also = PrefixModel.from_pretrained(tmp_path / "final", tiny("llama"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(also.eval()(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="different base model"):
        load(tmp_path / "final", tiny("llama", seed=1))


def test_state_dict_is_the_trainable_tensors_and_strict_load_refuses_another_prefix():
    pm = _model()
    state = pm.state_dict()
    assert set(state) == {k for k, p in pm.named_parameters() if p.requires_grad}
    other = _model()
    with torch.no_grad():
        for p in other.prefix.parameters():
            p.add_(1.0)
    assert other.load_state_dict(state).missing_keys == []
    for key, value in state.items():
        assert torch.equal(other.state_dict()[key], value)
    flat = _model(PrefixConfig(prefix_length=3, reparam=False))
    with pytest.raises(RuntimeError, match="missing trainable tensors"):
        flat.load_state_dict(state)


def _prefix_grad(pm: PrefixModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    pm.train()
    pm.zero_grad()
    pm(**batch).loss.backward()
    return pm.prefix.stacks["decoder"].table.grad.clone()


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_prefix_the_same_gradient(reentrant):
    pm = _model(PrefixConfig(prefix_length=3, reparam=False))
    batch = {k: torch.tensor(_data(3, seed=2)[k]) for k in ("input_ids", "attention_mask", "labels")}
    plain = _prefix_grad(pm, batch)
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert pm.is_gradient_checkpointing
    torch.testing.assert_close(_prefix_grad(pm, batch), plain, rtol=1e-5, atol=1e-7)
    assert plain.abs().sum() > 0
