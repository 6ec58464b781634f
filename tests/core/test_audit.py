"""Regression tests for the defects of the independent audit (issue 13); each failed before its fix."""

from __future__ import annotations

import json

import pytest
import torch
from reference import IdTokenizer
from tiny_models import VOCAB, tiny

from prefixtune import PrefixConfig, attach, load
from prefixtune.core.checkpoint import CONFIG_NAME
from prefixtune.core.inject import PrefixBatch


def _ids(b=1, t=5, seed=1):
    return torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _randomize(pm, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sp in pm.prefix.stacks.values():
            sp.table.copy_(torch.randn(sp.table.shape, generator=g) * scale)


@torch.no_grad()
def test_static_cache_greedy_equals_the_real_tokens_continuation():
    """Static cache + sdpa: no mask from the model, keys = the cache's capacity; queries must not see empty slots."""
    model = tiny("llama")
    tok = IdTokenizer()
    t0, x = tok("ab:c")["input_ids"], _ids()
    full = torch.cat([t0, x], dim=1)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    ref = model.generate(input_ids=full, attention_mask=torch.ones_like(full), **kw)[:, full.shape[1]:]
    pm = attach(model, PrefixConfig(init="text:ab:c", reparam=False), tok)
    static = pm.generate(input_ids=x, cache_implementation="static", **kw)[:, x.shape[1]:]
    dynamic = pm.generate(input_ids=x, **kw)[:, x.shape[1]:]
    assert torch.equal(dynamic, ref)
    assert torch.equal(static, ref)


@pytest.mark.parametrize("name", ["bart", "t5"])
@torch.no_grad()
def test_eager_without_a_mask_blocks_shorter_prefix_rows_like_sdpa(name):
    """Rows whose prefix is shorter (invalid positions) are blocked in eager exactly as in sdpa, with no mask given."""
    ids, dec = _ids(2, 6), _ids(2, 4, seed=2)
    outs = {}
    for attn in ("sdpa", "eager"):
        pm = attach(tiny(name, attn=attn), PrefixConfig(prefix_length=4, reparam=False))
        _randomize(pm)
        kv = {k: v.expand(2, *v.shape[1:]) for k, v in pm.prefix_batch().kv.items()}
        valid = torch.tensor([[True] * 4, [False, False, True, True]])
        with pm.injection.active(PrefixBatch(kv=kv, valid=valid)):
            both = pm.base(input_ids=ids, decoder_input_ids=dec).logits
        short = {k: v[:, 2:] for k, v in pm.prefix_batch().kv.items()}  # row 1 alone, with its 2 valid positions
        with pm.injection.active(PrefixBatch(kv=short)):
            alone = pm.base(input_ids=ids[1:], decoder_input_ids=dec[1:]).logits
        torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
        outs[attn] = both
    torch.testing.assert_close(outs["eager"], outs["sdpa"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_bf16_rows_with_shorter_prefixes_and_padding_equal_each_row_alone(attn):
    """bfloat16, Llama: a batch of a full-prefix row and a left-padded row whose prefix is shorter gives each row's
    logits alone, to bf16 rounding (the bool mask once added +1/+0 to eager scores: far beyond it)."""
    pm = attach(tiny("llama", attn=attn), PrefixConfig(prefix_length=4, reparam=False))
    _randomize(pm)
    pm.base.to(torch.bfloat16)
    pm.prefix.to(torch.bfloat16)
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1 left-padded by 2
    kv = {k: v.expand(2, *v.shape[1:]) for k, v in pm.prefix_batch().kv.items()}
    valid = torch.tensor([[True] * 4, [False, False, True, True]])
    with pm.injection.active(PrefixBatch(kv=kv, valid=valid)):
        both = pm.base(input_ids=ids, attention_mask=mask).logits.float()
    full = pm.prefix_batch().kv
    with pm.injection.active(PrefixBatch(kv=full)):
        first = pm.base(input_ids=ids[:1]).logits.float()
    with pm.injection.active(PrefixBatch(kv={k: v[:, 2:] for k, v in full.items()})):
        second = pm.base(input_ids=ids[1:, 2:]).logits.float()
    scale = first.abs().max().item()
    torch.testing.assert_close(both[:1], first, atol=2e-2 * scale, rtol=0)
    torch.testing.assert_close(both[1:, 2:], second, atol=2e-2 * scale, rtol=0)


@torch.no_grad()
def test_inputs_embeds_without_input_ids_equals_input_ids():
    """Decoder-only forward and generate from inputs_embeds alone (the pre-hook crashed with IndexError)."""
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=3, reparam=False))
    _randomize(pm)
    ids = _ids(2, 5)
    emb = pm.base.get_input_embeddings()(ids)
    torch.testing.assert_close(pm(inputs_embeds=emb).logits, pm(input_ids=ids).logits)
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    mask = torch.ones_like(ids)
    from_ids = pm.generate(input_ids=ids, attention_mask=mask, **kw)[:, ids.shape[1]:]
    from_embeds = pm.generate(inputs_embeds=emb, attention_mask=mask, **kw)
    assert torch.equal(from_embeds[:, -4:], from_ids)


def _change(model, which):
    with torch.no_grad():
        tensor = {"lm_head": model.lm_head.weight, "final_norm": model.model.norm.weight,
                  "first_layer_k_proj": model.model.layers[0].self_attn.k_proj.weight,
                  "middle_mlp": model.model.layers[1].mlp.down_proj.weight}[which]
        tensor[-1] += 0.01  # one row (a norm: one element) changed


@pytest.mark.parametrize("which", ["lm_head", "final_norm", "first_layer_k_proj", "middle_mlp"])
def test_any_changed_base_tensor_is_refused_on_load(tmp_path, which):
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=3, reparam=False))
    pm.save_pretrained(tmp_path)
    other = tiny("llama")
    _change(other, which)
    with pytest.raises(ValueError, match="tensors_sha256"):
        load(tmp_path, other)
    load(tmp_path, tiny("llama"))  # the same base still loads


def test_prefix_saved_before_full_fingerprints_still_loads(tmp_path):
    """A save of the first format (no tensors_sha256) loads, checked on what it recorded."""
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=3, reparam=False))
    pm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    del meta["base_model"]["tensors_sha256"], meta["base_model"]["excluded"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    loaded = load(tmp_path, tiny("llama"))
    assert torch.equal(loaded.prefix.stacks["decoder"].table, pm.prefix.stacks["decoder"].table)


def test_detach_and_a_refused_load_give_back_each_parameters_requires_grad(tmp_path):
    model = tiny("llama")
    frozen = {n for n, _ in model.named_parameters() if ".layers.0." in n}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    assert not any(p.requires_grad for p in pm.base.parameters())
    base = pm.detach()
    assert {n for n, p in base.named_parameters() if not p.requires_grad} == frozen
    other = attach(tiny("llama", seed=1), PrefixConfig(prefix_length=5, reparam=False))
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError):
        load(tmp_path, base)  # another base model: refused
    assert {n for n, p in base.named_parameters() if not p.requires_grad} == frozen


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@torch.no_grad()
def test_row_prefixes_each_row_equals_that_row_alone_with_its_prefix(tmp_path, name):
    """Several saved prefixes in one batch (public forward/generate argument): row r == row r alone with its own."""
    from prefixtune.core.checkpoint import load_prefix_kv

    dirs = []
    for i, length in enumerate((3, 5)):
        pm = attach(tiny(name), PrefixConfig(prefix_length=length, reparam=False))
        _randomize(pm, seed=i)
        pm.save_pretrained(tmp_path / str(i))
        pm.detach()
        dirs.append(tmp_path / str(i))
    model = tiny(name)
    kvs = [load_prefix_kv(d, model) for d in dirs] + [None]
    ids = _ids(3, 5)
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [1] * 5])
    ids = ids.masked_fill(mask == 0, 0)
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    host = attach(model, PrefixConfig(prefix_length=1, reparam=False))
    logits = host(input_ids=ids, attention_mask=mask, row_prefixes=kvs).logits
    tokens = host.generate(input_ids=ids, attention_mask=mask, row_prefixes=kvs, **kw)[:, 5:]
    host.detach()
    for r, d in enumerate([*dirs, None]):
        keep = mask[r] == 1
        row, row_mask = ids[r:r + 1, keep], torch.ones(1, int(keep.sum()), dtype=torch.long)
        alone = load(d, model) if d is not None else None
        run = alone if alone is not None else model
        ref = run(input_ids=row, attention_mask=row_mask).logits
        ref_tokens = run.generate(input_ids=row, attention_mask=row_mask, **kw)[:, row.shape[1]:]
        if alone is not None:
            alone.detach()
        torch.testing.assert_close(logits[r:r + 1, keep], ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(tokens[r:r + 1], ref_tokens)


@torch.no_grad()
def test_beyond_the_sliding_window_forward_and_generate_agree_the_prefix_stays_visible():
    """Meaning chosen: the prefix never slides out. Past the window, generate's step logits equal forward's."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4, initializer_range=0.2,
                        pad_token_id=0, attn_implementation="sdpa")
    pm = attach(MistralForCausalLM(cfg).eval(), PrefixConfig(prefix_length=3, reparam=False))
    _randomize(pm)
    x = _ids(1, 9)  # longer than the window
    out = pm.generate(input_ids=x, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
                      output_logits=True, return_dict_in_generate=True)
    full = pm(input_ids=out.sequences).logits
    steps = torch.stack(out.logits, dim=1)  # (1, 4, V): the logits that chose each new token
    torch.testing.assert_close(steps, full[:, x.shape[1] - 1:-1], atol=1e-4, rtol=1e-4)
    with pm.disabled():  # and the prefix matters there: it was not slid out
        bare = pm(input_ids=out.sequences).logits
    assert float((bare[:, -2] - full[:, -2]).abs().max()) > 1e-3


def test_fingerprint_samples_tensors_of_any_size():
    """The sample's indices are exact integers (float32 indices ran past the end of a 28,311,552-element tensor)."""
    from prefixtune.core.checkpoint import tensors_sha256

    holder = torch.nn.Module()
    holder.register_buffer("big", torch.zeros(28_311_552, dtype=torch.int8))  # SmolLM2-135M's embedding size
    before = tensors_sha256(holder)
    holder.big[-1] = 1  # the last element is in the sample
    assert tensors_sha256(holder) != before
