"""Encoders found by mechanism (no name table): P-tuning v2 on families the old table did not list."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from reference import attention_calls
from tiny_models import VOCAB, tiny_config
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from prefixtune import PrefixConfig, attach


def _classifier(model_type: str, **overrides):
    torch.manual_seed(0)
    cls = getattr(transformers, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[model_type])
    cfg = tiny_config(model_type)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cls(cfg).eval()


SUPPORTED = [  # docs/support.md, "Encoders", supported (scripts/support_matrix.py)
    "albert", "bert", "camembert", "data2vec-text", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
    "eurobert", "flaubert", "gte", "jina_embeddings_v3", "layoutlm", "megatron-bert", "mobilebert", "modernbert",
    "modernvbert", "mpnet", "nomic_bert", "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer",
    "tapas", "ultrabert", "ultravbert", "xlm", "xlm-roberta", "xlm-roberta-xl",
]


@pytest.mark.parametrize("model_type", SUPPORTED)
@torch.no_grad()
def test_encoder_prefix_padded_row_equals_row_alone_and_disabled_equals_base(model_type):
    model = _classifier(model_type)
    ids = torch.randint(4, VOCAB - 6, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    base = model(input_ids=ids, attention_mask=mask).logits
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    assert pm.spec.kind == "encoder" and [s.name for s in pm.spec.stacks] == ["encoder"]
    with pm.disabled():
        torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, base, atol=1e-5, rtol=1e-5)
    pm.prefix.stacks["encoder"].table.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    both = pm(input_ids=ids, attention_mask=mask).logits
    alone = pm(input_ids=ids[1:, :3], attention_mask=mask[1:, :3]).logits
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    assert float((both - base).abs().max()) > 1e-3  # the prefix is in every layer's attention


# core/shims.LEGACY_ATTENTION: encoders whose self-attention computes its scores itself
SHIMMED = ["rembert", "megatron-bert", "tapas", "roformer", "mpnet", "xlm", "flaubert", "deberta", "deberta-base",
           "deberta-v2", "deberta-v3"]
# DeBERTa (v1) as released (deberta-base / large / xlarge): c2p + p2c over relative positions, no absolute ones
DEBERTA_BASE = {"relative_attention": True, "pos_att_type": ["c2p", "p2c"], "max_relative_positions": -1,
                "position_biased_input": False}
# DeBERTa-v3's released configs: disentangled attention (c2p + p2c) over bucketed relative positions, shared keys
DEBERTA_V3 = {"relative_attention": True, "pos_att_type": ["p2c", "c2p"], "position_buckets": 8,
              "max_relative_positions": -1, "norm_rel_ebd": "layer_norm", "share_att_key": True,
              "position_biased_input": False}


def _shimmed(model_type: str):
    """A tiny classifier of a shimmed family; "deberta-base" / "deberta-v3": DeBERTa with its released settings."""
    if model_type == "deberta-base":
        return _classifier("deberta", **DEBERTA_BASE)
    if model_type == "deberta-v3":
        return _classifier("deberta-v2", **DEBERTA_V3)
    return _classifier(model_type)


def _hand_attention(module, call, prefix_kv, key_mask):
    """One self-attention of ``module`` by hand with the prefix in front, from the arguments of its ``call``
    (classic BERT with RoFormer's rotary, MPNet's relative position bias on the real columns, XLM).
    prefix_kv: (P, 2, heads, d); key_mask: (B, T) bool. Returns (B, T, hidden) as the module does."""
    if hasattr(module, "in_proj"):  # DeBERTa v1: fused projection, query / value biases, query scaled first
        hidden = call["hidden_states"]
        b, t, _ = hidden.shape
        q, k, v = module.transpose_for_scores(module.in_proj(hidden)).chunk(3, dim=-1)
        q = q + module.transpose_for_scores(module.q_bias[None, None, :])
        v = v + module.transpose_for_scores(module.v_bias[None, None, :])
        scale = 1 + len(module.pos_att_type)
        q = q / math.sqrt(q.shape[-1] * scale)
        scores = q @ k.transpose(-1, -2)
        if module.relative_attention:
            scores = scores + module.disentangled_att_bias(q, k, call["relative_pos"], call["rel_embeddings"], scale)
        pk, pv = (prefix_kv[:, i].permute(1, 0, 2)[None].expand(b, -1, -1, -1) for i in (0, 1))
        scores = torch.cat([q @ pk.transpose(-1, -2), scores], -1)
        allowed = torch.cat([torch.ones(b, prefix_kv.shape[0], dtype=torch.bool), key_mask], 1)[:, None, None, :]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (probs @ torch.cat([pv, v], 2)).transpose(1, 2).reshape(b, t, -1)
    if hasattr(module, "query_proj"):  # DeBERTa-v2: content scores over sqrt(d * scale), its bias on real keys
        hidden = call["hidden_states"]
        b, t, _ = hidden.shape
        heads = module.num_attention_heads
        q, k, v = (module.transpose_for_scores(lin(hidden), heads)
                   for lin in (module.query_proj, module.key_proj, module.value_proj))
        scale = 1 + len(module.pos_att_type)
        d = q.shape[-1]
        scores = (q @ k.transpose(-1, -2) / math.sqrt(d * scale)).view(b, heads, t, t)
        if module.relative_attention:
            scores = scores + module.disentangled_attention_bias(
                q, k, call["relative_pos"], call["rel_embeddings"], scale).view(b, heads, t, t)
        q, v = q.view(b, heads, t, d), v.view(b, heads, t, d)
        pk, pv = (prefix_kv[:, i].permute(1, 0, 2)[None].expand(b, -1, -1, -1) for i in (0, 1))
        scores = torch.cat([q @ pk.transpose(-1, -2) / math.sqrt(d * scale), scores], -1)
        allowed = torch.cat([torch.ones(b, prefix_kv.shape[0], dtype=torch.bool), key_mask], 1)[:, None, None, :]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (probs @ torch.cat([pv, v], 2)).transpose(1, 2).reshape(b, t, heads * d)
    if hasattr(module, "q_lin"):  # XLM / FlauBERT
        projs, heads, hd, out = (module.q_lin, module.k_lin, module.v_lin), module.n_heads, module.head_dim, \
            module.out_lin
    elif hasattr(module, "o"):  # MPNet
        projs, heads, hd, out = (module.q, module.k, module.v), module.num_attention_heads, \
            module.attention_head_size, module.o
    else:
        projs, heads, hd, out = (module.query, module.key, module.value), module.num_attention_heads, \
            module.attention_head_size, torch.nn.Identity()
    hidden = call.get("hidden_states", call.get("input"))
    b, t, _ = hidden.shape
    q, k, v = (lin(hidden).view(b, t, heads, hd).transpose(1, 2) for lin in projs)
    if call.get("sinusoidal_pos") is not None:
        q, k = module.apply_rotary_position_embeddings(call["sinusoidal_pos"], q, k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if call.get("position_bias") is not None:
        scores = scores + call["position_bias"]
    p = prefix_kv.shape[0]
    pk, pv = (prefix_kv[:, i].permute(1, 0, 2)[None].expand(b, -1, -1, -1) for i in (0, 1))
    scores = torch.cat([q @ pk.transpose(-1, -2) / math.sqrt(hd), scores], -1)
    allowed = torch.cat([torch.ones(b, p, dtype=torch.bool), key_mask], 1)[:, None, None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return out((probs @ torch.cat([pv, v], 2)).transpose(1, 2).reshape(b, t, heads * hd))


@pytest.mark.parametrize("model_type", SHIMMED)
@torch.no_grad()
def test_attention_outside_the_interface_carries_the_prefix_in_every_layer(model_type):
    """Encoders whose self-attention computes scores itself get a shim: the same arithmetic through the
    interface. Disabled, it gives the base model; every layer equals a hand-written attention with the
    prefix in front; a padded row equals the row alone; detach gives the module its own forward back."""
    model = _shimmed(model_type)
    ids = torch.randint(4, VOCAB - 6, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    base = model(input_ids=ids, attention_mask=mask).logits
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    assert pm.spec.kind == "encoder" and pm.spec.stack("encoder").num_layers == 2
    with pm.disabled():
        torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, base, atol=1e-5, rtol=1e-5)
    pm.prefix.stacks["encoder"].table.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    modules = dict(model.named_modules())
    with attention_calls(model, pm.spec) as seen:
        both = pm(input_ids=ids, attention_mask=mask).logits
    s = pm.spec.stack("encoder")
    kv = pm.prefix.stacks["encoder"].table.view(3, s.num_layers, 2, s.num_kv_heads, s.head_dim)
    for path, stack, layer in pm.spec.slots:
        call, out = seen[(stack, layer)]
        ref = _hand_attention(modules[path], call, kv[:, layer], mask.bool())
        torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    alone = pm(input_ids=ids[1:, :3], attention_mask=mask[1:, :3]).logits
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    assert float((both - base).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="output_attentions"):
        pm(input_ids=ids, attention_mask=mask, output_attentions=True)
    pm.detach()
    assert all("forward" not in m.__dict__ for m in model.modules())
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, base)


@pytest.mark.parametrize(("model_type", "reason"), [
    ("convbert", "attention interface"),  # its span convolution: no shim
    ("ibert", "no token embedding table"),  # quantized embeddings
    ("funnel", "the probe forward"),  # its pooling fails on a 3-token input
])
def test_refused_encoders_name_the_class_and_the_reason(model_type, reason):
    model = _classifier(model_type)
    with pytest.raises(ValueError) as err:
        attach(model, PrefixConfig(prefix_length=2))
    assert type(model).__name__ in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("model_type", ["deberta-base", "deberta-v3", "roformer", "rembert"])
def test_shimmed_encoder_trains_the_prefix_with_and_without_gradient_checkpointing(model_type):
    """The shim's attention is differentiable in the prefix, and a checkpointed backward (which recomputes each
    layer, shim included) gives the prefix the same gradients."""
    grads = []
    for checkpointing in (False, True):
        model = _shimmed(model_type)
        pm = attach(model, PrefixConfig(prefix_length=3, reparam=True))
        if checkpointing:
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        ids = torch.randint(4, VOCAB - 6, (2, 6), generator=torch.Generator().manual_seed(1))
        pm(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1])).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in pm.prefix.parameters()]))
    assert model.is_activation_checkpointing
    assert float(grads[0].abs().max()) > 1e-4
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_albert_shared_layer_gets_its_own_prefix_at_each_call(attn):
    """ALBERT runs one attention module once per layer: each call carries that layer's prefix, in call order
    (checked against hand-written attention call by call), and the counts restart with every forward."""
    model = _classifier("albert", num_hidden_layers=3)
    for m in model.modules():
        if getattr(m, "config", None) is not None:
            m.config._attn_implementation_internal = attn
    ids = torch.randint(4, VOCAB - 6, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    base = model(input_ids=ids, attention_mask=mask).logits
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    assert [layer for _, _, layer in pm.spec.slots] == [0, 1, 2] and len({p for p, _, _ in pm.spec.slots}) == 1
    with pm.disabled():
        torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, base, atol=1e-5, rtol=1e-5)
    pm.prefix.stacks["encoder"].table.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    module = model.get_submodule(pm.spec.slots[0][0])
    calls = []
    handle = module.register_forward_hook(
        lambda mod, args, kwargs, output: calls.append((args[0] if args else kwargs["hidden_states"], output[0])),
        with_kwargs=True)
    for _ in range(2):  # a second forward starts again at layer 0
        calls.clear()
        both = pm(input_ids=ids, attention_mask=mask).logits
        assert len(calls) == 3
        s = pm.spec.stack("encoder")
        kv = pm.prefix.stacks["encoder"].table.view(3, s.num_layers, 2, s.num_kv_heads, s.head_dim)
        for layer, (hidden, out) in enumerate(calls):
            ctx = _hand_attention(module, {"hidden_states": hidden}, kv[:, layer], mask.bool())
            ref = module.LayerNorm(hidden + module.dense(ctx))
            torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    handle.remove()
    alone = pm(input_ids=ids[1:, :3], attention_mask=mask[1:, :3]).logits
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    assert float((both - base).abs().max()) > 1e-3


def test_a_shared_module_called_more_often_than_its_layers_is_refused():
    """A recomputation (gradient checkpointing; ALBERT itself does not offer it) would call the shared module
    again in the same model call: refused rather than given the wrong layer's prefix."""
    from prefixtune.core.inject import SharedSlots

    slots, calls, module = SharedSlots([("encoder", 0), ("encoder", 1)]), {}, torch.nn.Linear(1, 1)
    assert [slots.next(module, calls), slots.next(module, calls)] == [("encoder", 0), ("encoder", 1)]
    with pytest.raises(ValueError, match="shared by 2 layers, was called 3 times in one forward"):
        slots.next(module, calls)
