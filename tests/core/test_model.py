"""Equivalence tests: the prefix does exactly what a KV cache of P past tokens would do."""

from __future__ import annotations

import pytest
import torch
from reference import attention_calls, llama_logits, seq2seq_attention
from tiny_models import CAUSAL, SEQ2SEQ, VOCAB, tiny
from transformers import DynamicCache

import prefixtune
from prefixtune import PrefixConfig, attach, read_spec

ATTN = ["sdpa", "eager"]


def _ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (b, t), generator=g)


def _randomize(pm: prefixtune.PrefixModel, seed: int = 0, scale: float = 1.0) -> None:
    """Give a flat prefix large random values so that it visibly matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sp in pm.prefix.stacks.values():
            sp.table.copy_(torch.randn(sp.table.shape, generator=g) * scale)


def _flat(pm, stack="decoder") -> torch.Tensor:
    return pm.prefix.stacks[stack]().detach()


def _model_inputs(name: str, ids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
    inputs = {"input_ids": ids, "attention_mask": mask if mask is not None else torch.ones_like(ids)}
    if name in SEQ2SEQ:
        inputs["decoder_input_ids"] = _ids(ids.shape[0], 5, seed=7)
    return inputs


@pytest.mark.parametrize("name", CAUSAL + SEQ2SEQ)
@torch.no_grad()
def test_length_zero_and_disabled_give_the_base_model(name):
    model = tiny(name)
    inputs = _model_inputs(name, _ids(2, 6))
    ref = model(**inputs).logits
    pm = attach(model, PrefixConfig(prefix_length=0))
    assert torch.equal(pm(**inputs).logits, ref)
    pm.detach()
    pm = attach(model, PrefixConfig(prefix_length=4, reparam=False))
    _randomize(pm)
    assert not torch.allclose(pm(**inputs).logits, ref, atol=1e-3)
    with pm.disabled():
        assert torch.equal(pm(**inputs).logits, ref)
    base = pm.detach()
    assert torch.equal(base(**inputs).logits, ref)


def test_spec_reads_gqa_and_explicit_head_dim():
    llama = read_spec(tiny("llama"))
    assert (llama.stacks[0].num_layers, llama.stacks[0].num_kv_heads, llama.stacks[0].head_dim) == (3, 2, 8)
    qwen3 = read_spec(tiny("qwen3"))  # head_dim 16 != hidden 32 // 4 heads
    assert (qwen3.stacks[0].num_kv_heads, qwen3.stacks[0].head_dim, qwen3.stacks[0].kv_dim) == (2, 16, 32)
    t5 = read_spec(tiny("t5"))
    assert [s.name for s in t5.stacks] == ["encoder", "decoder", "cross"]
    pm = attach(tiny("qwen3"), PrefixConfig(prefix_length=5, reparam=False))
    assert pm.num_trainable_parameters() == 5 * 2 * 2 * 2 * 16


def test_model_without_attention_interface_is_refused_naming_class_and_reason():
    from tiny_models import tiny_seq2seq_lm

    # ProphetNet's encoder-decoder computes attention in its own modules (no ALL_ATTENTION_FUNCTIONS call) and has
    # no shim; its causal LM is refused earlier, as not causal (test_every_architecture)
    with pytest.raises(ValueError, match=r"ProphetNetForConditionalGeneration.*model_type='prophetnet'.*attention "
                                         r"interface"):
        attach(tiny_seq2seq_lm("prophetnet"))


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_logits_match_hand_written_reference(name, attn):
    model = tiny(name, attn)
    pm = attach(model, PrefixConfig(prefix_length=5, reparam=True, reparam_hidden=16))
    ids = _ids(2, 7)
    ours = pm(input_ids=ids).logits
    ref = llama_logits(model, ids, _flat(pm))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_logits_match_a_kv_cache_of_p_past_tokens(name):
    """transformers' own cache path, pre-filled with the prefix, is a second reference."""
    model = tiny(name)
    pm = attach(model, PrefixConfig(prefix_length=4, reparam=False))
    _randomize(pm)
    ids = _ids(2, 6)
    ours = pm(input_ids=ids).logits
    spec, flat = pm.spec.stacks[0], _flat(pm)
    kv = flat.view(4, spec.num_layers, 2, spec.num_kv_heads, spec.head_dim)
    cache = DynamicCache(config=model.config)
    for layer in range(spec.num_layers):
        k = kv[:, layer, 0].permute(1, 0, 2)[None].expand(2, -1, -1, -1)
        v = kv[:, layer, 1].permute(1, 0, 2)[None].expand(2, -1, -1, -1)
        cache.update(k.contiguous(), v.contiguous(), layer)
    with pm.disabled(), torch.no_grad():
        ref = model(input_ids=ids, past_key_values=cache, attention_mask=torch.ones(2, 10)).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", SEQ2SEQ)
def test_seq2seq_every_attention_matches_reference(name, attn):
    """Encoder self-, decoder self- and cross-attention each get their own prefix, per layer."""
    model = tiny(name, attn)
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    _randomize(pm, scale=0.5)
    ids = _ids(2, 6)
    enc_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    dec = _ids(2, 5, seed=3)
    with attention_calls(model, pm.spec) as records, torch.no_grad():
        pm(input_ids=ids, attention_mask=enc_mask, decoder_input_ids=dec)
    assert len(records) == len(pm.spec.slots)
    modules = dict(model.named_modules())
    s, t = ids.shape[1], dec.shape[1]
    pad_allowed = enc_mask.bool()[:, None, None, :]
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None, None]
    for path, stack, layer in pm.spec.slots:
        call, out = records[(stack, layer)]
        hidden = call["hidden_states"]
        other = next((call[k] for k in ("key_value_states", "encoder_hidden_states") if call.get(k) is not None),
                     hidden)
        sp = pm.spec.stack(stack)
        kv = _flat(pm, stack).view(3, sp.num_layers, 2, sp.num_kv_heads, sp.head_dim)[:, layer]
        allowed = {"encoder": pad_allowed, "decoder": causal, "cross": pad_allowed}[stack]
        bias = None
        if name == "t5" and stack != "cross":
            first = modules[path.replace(f"block.{layer}.", "block.0.")]
            q_len = s if stack == "encoder" else t
            bias = first.compute_bias(q_len, q_len)
        ref = seq2seq_attention(modules[path], name, hidden, other, kv, allowed, bias)
        # padded encoder positions attend to nothing real in the reference; compare real rows only
        rows = enc_mask.bool() if stack == "encoder" else torch.ones(2, out.shape[1], dtype=torch.bool)
        torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5, msg=f"{stack} layer {layer}")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bart", "t5"])
def test_cached_greedy_generation_equals_full_recomputation(name):
    model = tiny(name)
    pm = attach(model, PrefixConfig(prefix_length=4, reparam=False))
    _randomize(pm)
    ids = _ids(1, 5)
    n = 6
    out = pm.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    # recompute everything from scratch each step, no cache (min_new_tokens keeps EOS = 2 out)
    def next_token(logits):
        return logits[:, -1:].index_fill(-1, torch.tensor([2]), float("-inf")).argmax(-1)

    if name in SEQ2SEQ:
        seq = out[:, :1]
        for _ in range(n):
            logits = pm(input_ids=ids, decoder_input_ids=seq, use_cache=False).logits
            seq = torch.cat([seq, next_token(logits)], dim=1)
        expected = seq
    else:
        seq = ids
        for _ in range(n):
            logits = pm(input_ids=seq, use_cache=False).logits
            seq = torch.cat([seq, next_token(logits)], dim=1)
        expected = seq
    assert torch.equal(out, expected)
    # a prefix silently dropped in generate() would give the base model's step scores
    kwargs = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "output_scores": True,
              "return_dict_in_generate": True}
    ours = pm.generate(input_ids=ids, **kwargs).scores
    with pm.disabled():
        base = pm.generate(input_ids=ids, **kwargs).scores
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(ours, base, strict=True))


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_left_padded_batch_equals_rows_alone(name):
    model = tiny(name)
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=True, reparam_hidden=16))
    rows = [_ids(1, 7, seed=1)[0], _ids(1, 4, seed=2)[0]]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 7 - len(r):] = r
        mask[i, 7 - len(r):] = 1
    with torch.no_grad():
        batched = pm(input_ids=ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = pm(input_ids=r[None]).logits[0]
            torch.testing.assert_close(batched[i, 7 - len(r):], alone, atol=1e-5, rtol=1e-5)
    for kwargs in ({"do_sample": False}, {"num_beams": 3, "do_sample": False}):
        gen = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                          pad_token_id=0, **kwargs)
        for i, r in enumerate(rows):
            alone = pm.generate(input_ids=r[None], max_new_tokens=5, min_new_tokens=5, pad_token_id=0, **kwargs)
            assert torch.equal(gen[i, 7:], alone[0, len(r):]), kwargs


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_seq2seq_padded_batch_equals_rows_alone(name):
    model = tiny(name)
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    _randomize(pm, scale=0.5)
    rows = [_ids(1, 7, seed=1)[0], _ids(1, 4, seed=2)[0]]
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    gen = pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, num_beams=2)
    for i, r in enumerate(rows):
        alone = pm.generate(input_ids=r[None], max_new_tokens=5, min_new_tokens=5, num_beams=2)
        assert torch.equal(gen[i, : alone.shape[1]], alone[0])


def test_seeded_sampling_is_reproducible_and_uses_the_prefix():
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=4, reparam=False))
    _randomize(pm)
    ids = _ids(2, 5)

    def sample(seed):
        torch.manual_seed(seed)
        return pm.generate(input_ids=ids, do_sample=True, top_p=0.9, temperature=1.0, max_new_tokens=8,
                           min_new_tokens=8)

    assert torch.equal(sample(3), sample(3))
    torch.manual_seed(3)
    with pm.disabled():
        base = pm.generate(input_ids=ids, do_sample=True, top_p=0.9, max_new_tokens=8, min_new_tokens=8)
    assert not torch.equal(base, sample(3))


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_fold_keeps_logits_and_shrinks_parameters(name):
    model = tiny(name)
    pm = attach(model, PrefixConfig(prefix_length=4, reparam=True, reparam_hidden=32))
    inputs = _model_inputs(name, _ids(2, 6))
    before = pm(**inputs).logits.detach()
    pm.fold()
    after = pm(**inputs).logits.detach()
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    expected = sum(4 * s.width for s in pm.spec.stacks)
    assert pm.num_trainable_parameters() == expected
    # training can continue on the folded table
    loss = pm(**inputs, labels=inputs.get("decoder_input_ids", inputs["input_ids"])).loss
    loss.backward()
    assert all(p.grad is not None for p in pm.prefix.parameters())


@pytest.mark.parametrize("name", ["llama", "bart"])
def test_every_layer_slot_gets_its_own_gradient(name):
    pm = attach(tiny(name), PrefixConfig(prefix_length=3, reparam=False))
    inputs = _model_inputs(name, _ids(2, 6))
    pm(**inputs, labels=inputs.get("decoder_input_ids", inputs["input_ids"])).loss.backward()
    for stack, sp in pm.prefix.stacks.items():
        s = pm.spec.stack(stack)
        grad = sp.table.grad.view(3, s.num_layers, 2, s.num_kv_heads, s.head_dim)
        for layer in range(s.num_layers):
            for kv in range(2):
                assert grad[:, layer, kv].abs().sum() > 0, (stack, layer, kv)
    assert all(p.grad is None for p in pm.base.parameters())


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_gradient_checkpointing_gives_same_loss_and_gradients(name):
    def run(checkpointing: bool):
        pm = attach(tiny(name), PrefixConfig(prefix_length=3, reparam=True, reparam_hidden=16))
        torch.manual_seed(0)
        pm.prefix.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        pm.train()
        if checkpointing:
            pm.gradient_checkpointing_enable()
        inputs = _model_inputs(name, _ids(2, 6))
        loss = pm(**inputs, labels=inputs.get("decoder_input_ids", inputs["input_ids"])).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in pm.prefix.named_parameters()}

    loss_a, grads_a = run(False)
    loss_b, grads_b = run(True)
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bart", "t5"])
def test_training_steps_lower_loss_and_leave_base_unchanged(name):
    model = tiny(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = attach(model, PrefixConfig(prefix_length=4, reparam=True, reparam_hidden=32))
    assert {n for n, p in pm.named_parameters() if p.requires_grad} == {
        f"prefix.{n}" for n, _ in pm.prefix.named_parameters()
    }
    inputs = _model_inputs(name, _ids(4, 8))
    labels = inputs.get("decoder_input_ids", inputs["input_ids"])
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)

    def eval_loss() -> float:
        pm.eval()
        with torch.no_grad():
            return pm(**inputs, labels=labels).loss.item()

    start = eval_loss()
    for _ in range(10):
        pm.train()
        loss = pm(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_loss()
    assert end < start - 0.05, (start, end)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
