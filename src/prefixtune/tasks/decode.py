"""Batched text generation from sources: prompts → left-padded batches → generate → strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from prefixtune.tasks.encoding import Format, encode_prompt, pad_rows


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists → (input_ids, attention_mask), both (B, T), padded on the left."""
    return pad_rows(rows, pad_id, "left"), pad_rows([[1] * len(r) for r in rows], 0, "left")


def clean_output(text: str) -> str:
    """The first line of a generated continuation, stripped (table-to-text targets are one line)."""
    return text.strip().split("\n", 1)[0].strip()


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    sources: Sequence[str],
    fmt: Format,
    batch_size: int = 16,
    num_beams: int = 1,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    progress: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """One output string per source, in source order.

    ``model`` is a ``PrefixModel`` (or any model with a transformers-style ``generate``).
    Sources are sorted by prompt length into batches to limit padding.
    """
    prompts = [encode_prompt(tokenizer, s, fmt) for s in sources]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    bar = tqdm(total=len(prompts), disable=not progress, desc="generate", unit="src")
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([prompts[i] for i in idx], pad_id)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=do_sample,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                **generate_kwargs,
            )
            new = out[:, ids.shape[1]:]
            for row, i in enumerate(idx):
                outputs[i] = clean_output(tokenizer.decode(new[row], skip_special_tokens=True))
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return outputs
