"""``transformers.Trainer`` (and its subclasses, e.g. TRL's) that also writes prefixtune's prefix format.

A plain ``Trainer(model=prefix_model)`` already trains, evaluates, resumes and reloads the best model with
prefix-only checkpoints: ``PrefixModel.state_dict()`` is the trainable tensors (see ``core/hf.py``). What a plain
``Trainer`` cannot do is write ``prefix.safetensors`` + ``prefix_config.json`` (the format ``prefixtune.load``
reads, with the base model's fingerprint): its ``_save`` calls ``save_pretrained`` only on a ``PreTrainedModel``
or ``PeftModel`` (transformers/trainer.py, ``Trainer._save``: ``supported_classes``). ``PrefixTrainer`` adds that
to every ``checkpoint-N`` and to ``save_model``.
"""

from __future__ import annotations

from transformers import Trainer

from prefixtune.core.model import PrefixModel


class PrefixSaveMixin:
    """Mix in before a ``Trainer`` class: ``_save`` also writes the prefix in prefixtune's format (unfolded, so a
    ``checkpoint-N`` stays resumable), and refuses a model that is not a ``PrefixModel``."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]  # model.safetensors (prefix only), tokenizer, args
        if not self.args.should_save:  # type: ignore[attr-defined]
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)  # type: ignore[attr-defined]
        if not isinstance(model, PrefixModel):
            raise TypeError(f"{type(self).__name__} saves a PrefixModel's prefix; its model is {type(model).__name__}")
        model.save_pretrained(output_dir or self.args.output_dir, fold=False)  # type: ignore[attr-defined]


def prefix_trainer(trainer_class: type) -> type:
    """``trainer_class`` (``Trainer`` or a subclass such as ``trl.SFTTrainer``) with ``PrefixSaveMixin``."""
    return type(f"Prefix{trainer_class.__name__}", (PrefixSaveMixin, trainer_class), {})


class PrefixTrainer(PrefixSaveMixin, Trainer):
    """``transformers.Trainer`` whose saves also load with ``prefixtune.load(folder, base_model)``."""
