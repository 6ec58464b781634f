"""Encoder-decoders found by mechanism: every supported family carries encoder, decoder and cross prefixes.

The list is what ``scripts/support_matrix.py`` finds supported (docs/support.md, "Encoder-decoders"); each is
checked on a tiny model built from the family's own config (``reference.seq2seq_contract``).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from reference import attention_calls, seq2seq_contract
from tiny_models import tiny_config, tiny_seq2seq_lm

from prefixtune import PrefixConfig, attach

SUPPORTED = [  # docs/support.md, "Encoder-decoders", supported
    "bart", "blenderbot", "blenderbot-small", "encoder-decoder", "longt5", "m2m_100", "marian", "mbart", "mt5",
    "mvp", "nllb-moe", "pegasus", "plbart", "seamless_m4t", "seamless_m4t_v2", "switch_transformers", "t5", "umt5",
]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_encoder_decoder_carries_three_prefixes_and_generates_as_it_computes(model_type):
    seq2seq_contract(tiny_seq2seq_lm(model_type))


@pytest.mark.parametrize(("model_type", "reason"), [
    # the encoder's attention is outside the interface: before, these (and LongT5, now shimmed) were accepted
    # with decoder and cross prefixes only, and the encoder silently carried none
    ("pegasus_x", "its encoder attention does not go through"),
    ("bigbird_pegasus", "its encoder attention does not go through"),
    ("fsmt", "computes attention inside its own module"),
])
def test_encoder_decoders_without_all_three_prefixes_are_refused(model_type, reason):
    model = tiny_seq2seq_lm(model_type)
    with pytest.raises(ValueError) as err:
        attach(model, PrefixConfig(prefix_length=2))
    assert type(model).__name__ in str(err.value) and reason in str(err.value)


def _band_reference(module, hidden, prefix_kv, key_mask):
    """LongT5's local attention written as full attention: token i sees tokens j with |i - j| <= local_radius
    (its 3-block window), with T5's bucketed relative bias of j - i, plus the P prefix columns (no bias).
    hidden: (B, T, d_model); prefix_kv: (P, 2, heads, d); key_mask: (B, T) bool. Returns (B, T, d_model)."""
    b, t, _ = hidden.shape
    h, d = module.n_heads, module.key_value_proj_dim
    q, k, v = (lin(hidden).view(b, t, h, d).transpose(1, 2) for lin in (module.q, module.k, module.v))
    rel = torch.arange(t)[None, :] - torch.arange(t)[:, None]
    bucket = module._relative_position_bucket(rel, bidirectional=True,
                                              num_buckets=module.relative_attention_num_buckets,
                                              max_distance=module.relative_attention_max_distance)
    bias = module.relative_attention_bias(bucket).permute(2, 0, 1)[None]  # (1, h, T, T)
    allowed = (rel.abs() < module.block_len)[None, None] & key_mask[:, None, None, :]
    pk, pv = (prefix_kv[:, i].permute(1, 0, 2)[None].expand(b, -1, -1, -1) for i in (0, 1))
    scores = torch.cat([q @ pk.transpose(-1, -2), (q @ k.transpose(-1, -2) + bias).masked_fill(~allowed, -1e10)], -1)
    out = scores.softmax(-1) @ torch.cat([pv, v], 2)
    return module.o(out.transpose(1, 2).reshape(b, t, h * d))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("attention", ["local", "transient-global"])
def test_longt5_encoder_carries_the_prefix_in_every_block(attention):
    """LongT5's encoder attends within 3-block windows (and, transient-global, to block aggregates): a shim runs
    its blocks through the interface so that every query block also sees the prefix. With blocks of 3 over 8
    tokens: the contract of every encoder-decoder, and (local) the first layer against full attention with the
    band mask and bucketed bias written out."""
    cfg = tiny_config("longt5")
    cfg.encoder_attention_type, cfg.local_radius, cfg.global_block_size = attention, 2, 3
    cfg.decoder_start_token_id = 0
    torch.manual_seed(0)
    model = transformers.LongT5ForConditionalGeneration(cfg).eval()
    assert model.encoder.block[0].layer[0].__class__.__name__.startswith(
        "LongT5LayerLocal" if attention == "local" else "LongT5LayerTransientGlobal")
    seq2seq_contract(model)
    if attention == "local":
        pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
        with torch.no_grad():
            for sp in pm.prefix.stacks.values():
                sp.table.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        ids = torch.randint(4, 84, (2, 8), generator=torch.Generator().manual_seed(1))
        mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
        path = next(p for p, stack, layer in pm.spec.slots if stack == "encoder" and layer == 0)
        module = model.get_submodule(path)
        with attention_calls(model, pm.spec) as seen, torch.no_grad():
            pm(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :2])
            s = pm.spec.stack("encoder")
            kv = pm.prefix.stacks["encoder"].table.view(3, s.num_layers, 2, s.num_kv_heads, s.head_dim)[:, 0]
            call, out = seen[("encoder", 0)]
            ref = _band_reference(module, call["hidden_states"], kv, mask.bool())
        torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_mvp_with_its_own_prompts_keeps_them_and_adds_the_prefix():
    """MVP's attention (a shim) keeps the model's own task prompts in front of its keys; cross-attention is told
    by its module name, since its keys hold the prompts besides the source."""
    cfg = tiny_config("mvp")
    cfg.use_prompt, cfg.prompt_length, cfg.prompt_mid_dim, cfg.decoder_start_token_id = True, 4, 16, 0
    torch.manual_seed(0)
    model = transformers.MvpForConditionalGeneration(cfg).eval()
    gen = model.generation_config
    gen.forced_bos_token_id = gen.forced_eos_token_id = None
    gen.decoder_start_token_id = 0
    seq2seq_contract(model)
