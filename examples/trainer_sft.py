"""Prefix-tune a causal LM with TRL's SFTTrainer (completion-only loss on a chat dataset), then load the prefix.

    python examples/trainer_sft.py --model PATH_OR_NAME --out runs/sft-prefix [--max-steps 30]

The dataset is a few chat turns written here (replace it with yours: "prompt"/"completion" message lists).
``prefix_trainer(SFTTrainer)`` is SFTTrainer that also writes prefixtune's prefix files into every checkpoint-N
and into ``save_model``'s folder, so that ``prefixtune.load(folder, base_model)`` reads them back.
"""

from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from prefixtune import PrefixConfig, attach, load
from prefixtune.integrations.trainer import prefix_trainer

# A minimal template for a base model's tokenizer that has none (chat models bring theirs).
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def chat_data() -> Dataset:
    rows = [{"prompt": [{"role": "user", "content": f"name : {n} | food : {f}"}],
             "completion": [{"role": "assistant", "content": f"{n} serves {f}."}]}
            for n in ("Aro", "Bib", "Cot", "Dax") for f in ("fish", "rice", "tea")]
    return Dataset.from_list(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a local Hugging Face folder or a hub name")
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=30)
    a = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    tokenizer.chat_template = tokenizer.chat_template or TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa")
    pm = attach(model, PrefixConfig(prefix_length=8, reparam_hidden=64))
    pm.print_trainable_parameters()

    gpu = torch.cuda.is_available()
    args = SFTConfig(a.out, max_steps=a.max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
                     completion_only_loss=True, activation_checkpointing=False, save_steps=10, logging_steps=5,
                     report_to=[], use_cpu=not gpu, bf16=gpu and torch.cuda.is_bf16_supported())
    trainer = prefix_trainer(SFTTrainer)(model=pm, args=args, train_dataset=chat_data(), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(f"{a.out}/final")  # prefix.safetensors + prefix_config.json (+ tokenizer)

    again = load(f"{a.out}/final", AutoModelForCausalLM.from_pretrained(a.model, attn_implementation="sdpa"))
    prompt = tokenizer.apply_chat_template(chat_data()[0]["prompt"], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = again.generate(**ids, max_new_tokens=12, do_sample=False)
    print(repr(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)))


if __name__ == "__main__":
    main()
