"""Initialization from real words, and the paper's ablations: embedding-only and infix."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny

from prefixtune import PrefixConfig, attach


class CharTokenizer:
    """A tokenizer stand-in: one id per character (no downloads)."""

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return {"input_ids": torch.tensor([[3 + (ord(c) % (VOCAB - 3)) for c in text]])}


def _ids(b=2, t=6, seed=1):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("reparam", [False, True])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
@torch.no_grad()
def test_init_from_words_equals_the_words_in_front(name, reparam):
    """Initialized from "table:", the prefix acts exactly like those tokens preceding the input."""
    model = tiny(name)
    words = CharTokenizer()("table:")["input_ids"]
    x = _ids(1, 5)
    ref = model(input_ids=torch.cat([words, x], dim=1)).logits[:, words.shape[1]:]
    pm = attach(model, PrefixConfig(init="text:table:", reparam=reparam, reparam_hidden=64), CharTokenizer())
    assert pm.prefix_config.prefix_length == words.shape[1]
    torch.testing.assert_close(pm(input_ids=x).logits, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_init_from_words_on_seq2seq_fills_all_three_stacks(name):
    model = tiny(name)
    pm = attach(model, PrefixConfig(init="text:summarize", reparam=False), CharTokenizer())
    assert pm.prefix_config.prefix_length == len("summarize")
    assert set(pm.prefix.stacks) == {"encoder", "decoder", "cross"}
    for sp in pm.prefix.stacks.values():
        assert sp.table.abs().sum() > 0


def test_init_text_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        attach(tiny("llama"), PrefixConfig(init="text:hello"))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@torch.no_grad()
def test_embedding_only_equals_virtual_tokens_at_the_input(name):
    model = tiny(name)
    pm = attach(model, PrefixConfig(prefix_length=3, mode="embedding-only", reparam=False, init_std=1.0))
    assert pm.num_trainable_parameters() == 3 * pm.spec.hidden_size
    x = _ids(2, 5)
    virtual = pm.prefix.stacks["embedding"].table[None].expand(2, -1, -1)
    embeds = torch.cat([virtual, model.get_input_embeddings()(x)], dim=1)
    with pm.disabled():
        ref = model(inputs_embeds=embeds).logits[:, 3:]
    torch.testing.assert_close(pm(input_ids=x).logits, ref, atol=1e-5, rtol=1e-5)


def test_embedding_only_trains_only_the_input_embeddings():
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=3, mode="embedding-only", reparam=True,
                                            reparam_hidden=16))
    x = _ids(2, 5)
    pm(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pm.prefix.parameters())
    assert all(p.grad is None for p in pm.base.parameters())


def _source_target(pad_left: int = 0):
    src, tgt = _ids(1, 4, seed=3)[0], _ids(1, 3, seed=4)[0]
    ids = torch.cat([torch.zeros(pad_left, dtype=torch.long), src, tgt])[None]
    mask = torch.cat([torch.zeros(pad_left), torch.ones(7)]).long()[None]
    labels = torch.cat([torch.full((pad_left + 4,), -100), tgt])[None]
    return ids, mask, labels


@torch.no_grad()
def test_infix_is_invisible_to_the_source_and_changes_the_target():
    model = tiny("llama")
    pm = attach(model, PrefixConfig(prefix_length=3, mode="infix", reparam=False, init_std=1.0))
    ids, mask, labels = _source_target()
    ours = pm(input_ids=ids, attention_mask=mask, labels=labels).logits
    with pm.disabled():
        base = pm(input_ids=ids, attention_mask=mask).logits
    # the source tokens before the separator (the last source token) do not see the infix
    torch.testing.assert_close(ours[:, :3], base[:, :3], atol=1e-6, rtol=0)
    assert not torch.allclose(ours[:, 3:], base[:, 3:], atol=1e-3)
    # a padded row gives the same result as the row alone
    padded_ids, padded_mask, padded_labels = _source_target(pad_left=2)
    padded = pm(input_ids=padded_ids, attention_mask=padded_mask, labels=padded_labels).logits
    torch.testing.assert_close(padded[:, 2:], ours, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_infix_generation_matches_teacher_forced_logits():
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=3, mode="infix", reparam=False, init_std=1.0))
    src = _ids(1, 4, seed=3)
    out = pm.generate(input_ids=src, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    labels = torch.cat([torch.full((1, 4), -100), out[:, 4:]], dim=1)
    logits = pm(input_ids=out, labels=labels).logits
    masked = logits[:, 3:-1].index_fill(-1, torch.tensor([2]), float("-inf"))
    assert torch.equal(masked.argmax(-1), out[:, 4:])


def test_modes_other_than_prefix_are_refused_on_seq2seq():
    with pytest.raises(ValueError, match="mode 'infix' is implemented for decoder-only models"):
        attach(tiny("t5"), PrefixConfig(mode="infix"))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="prefix_length"):
        PrefixConfig(prefix_length=-1)
    with pytest.raises(ValueError, match="mode must be one of"):
        PrefixConfig(mode="suffix")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every prefix stack"):
        attach(tiny("llama"), PrefixConfig(decoder_prefix=False))
