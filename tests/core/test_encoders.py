"""P-tuning v2 on encoders: deep prompts on BERT-family models with a trained classification head."""

from __future__ import annotations

import math

import pytest
import torch
from reference import attention_calls
from tiny_models import VOCAB
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from prefixtune import PrefixConfig, load
from prefixtune.core.checkpoint import WEIGHTS_NAME
from prefixtune.tasks.classification import attach_classifier, classification_metrics

KW = {"vocab_size": VOCAB, "num_labels": 3, "pad_token_id": 0}


def encoder(name: str, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    if name == "bert":
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **KW)
        model = BertForSequenceClassification(cfg)
    elif name == "roberta":
        cfg = RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=80, **KW)
        model = RobertaForSequenceClassification(cfg)
    elif name == "distilbert":
        cfg = DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **KW)
        model = DistilBertForSequenceClassification(cfg)
    else:
        cfg = ElectraConfig(embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, **KW)
        model = ElectraForSequenceClassification(cfg)
    model.config._attn_implementation_internal = attn
    for m in model.modules():
        if getattr(m, "config", None) is not None:
            m.config._attn_implementation_internal = attn
    return model.eval()


ENCODERS = ["bert", "roberta", "distilbert", "electra"]


def _batch():
    ids = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def _randomize(pm, scale=0.5):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sp in pm.prefix.stacks.values():
            sp.table.copy_(torch.randn(sp.table.shape, generator=g) * scale)


@pytest.mark.parametrize("name", ENCODERS)
@torch.no_grad()
def test_disabled_prefix_gives_the_base_model(name):
    model = encoder(name)
    ids, mask = _batch()
    ref = model(input_ids=ids, attention_mask=mask).logits
    pm = attach_classifier(model, PrefixConfig(prefix_length=4, reparam=False))
    _randomize(pm)
    assert not torch.allclose(pm(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-4)
    with pm.disabled():
        assert torch.equal(pm(input_ids=ids, attention_mask=mask).logits, ref)


def _hand_attention(module, name, hidden, prefix_kv, key_mask):
    """One self-attention by hand with the prefix in front; key_mask (B, T) bool."""
    if name == "distilbert":
        q_lin, k_lin, v_lin, heads = module.q_lin, module.k_lin, module.v_lin, module.n_heads
    else:
        q_lin, k_lin, v_lin, heads = module.query, module.key, module.value, module.num_attention_heads
    b, t, d = hidden.shape
    hd = d // heads
    q, k, v = (lin(hidden).view(b, t, heads, hd).transpose(1, 2) for lin in (q_lin, k_lin, v_lin))
    p = prefix_kv.shape[0]
    pk = prefix_kv[:, 0].permute(1, 0, 2)[None].expand(b, -1, -1, -1)
    pv = prefix_kv[:, 1].permute(1, 0, 2)[None].expand(b, -1, -1, -1)
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    allowed = torch.cat([torch.ones(b, p, dtype=torch.bool), key_mask], 1)[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    return module.out_lin(out) if name == "distilbert" else out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["bert", "distilbert"])
@torch.no_grad()
def test_every_layer_matches_hand_written_attention(name, attn):
    model = encoder(name, attn=attn)
    pm = attach_classifier(model, PrefixConfig(prefix_length=3, reparam=False))
    _randomize(pm)
    modules = dict(model.named_modules())
    ids, mask = _batch()
    with attention_calls(model, pm.spec) as seen:
        pm(input_ids=ids, attention_mask=mask)
    s = pm.spec.stack("encoder")
    kv = pm.prefix.stacks["encoder"].table.view(3, s.num_layers, 2, s.num_kv_heads, s.head_dim)
    for path, stack, layer in pm.spec.slots:
        call, out = seen[(stack, layer)]
        hidden = next(iter(call.values()))  # BERT's hidden_states, DistilBERT's query
        ref = _hand_attention(modules[path], name, hidden, kv[:, layer], mask.bool())
        rows = mask.bool()  # padded query positions are not compared
        torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ENCODERS)
@torch.no_grad()
def test_padding_does_not_change_a_rows_result(name):
    pm = attach_classifier(encoder(name), PrefixConfig(prefix_length=3, reparam=False))
    _randomize(pm)
    ids, mask = _batch()
    batched = pm(input_ids=ids, attention_mask=mask).logits
    alone = pm(input_ids=ids[1:, :4], attention_mask=mask[1:, :4]).logits
    torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["bert", "distilbert"])
def test_head_trains_with_the_prefix_and_is_saved_with_it(tmp_path, name):
    model = encoder(name)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    pm = attach_classifier(model, PrefixConfig(prefix_length=3, reparam=True, reparam_hidden=16))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("prefix.", "base.classifier.", "base.pre_classifier.")) for n in trainable)
    assert any(n.startswith("base.") for n in trainable)
    ids, mask = _batch()
    labels = torch.tensor([0, 2])
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    pm.eval()
    with torch.no_grad():
        start = pm(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    for _ in range(10):
        loss = pm(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = pm(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        ref = pm(input_ids=ids, attention_mask=mask).logits
    assert end < start - 0.1
    heads = pm.train_modules
    changed = {k for k in frozen if not torch.equal(frozen[k], model.state_dict()[k])}
    assert changed and all(k.startswith(heads) for k in changed)  # only the head moved in the base

    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert "encoder.table" in keys and {k for k in keys if k.startswith("module.")} == {
        f"module.{h}.{p}" for h in heads for p in ("weight", "bias")}
    loaded = load(tmp_path, encoder(name))  # a fresh model: its own random head is replaced
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="weights_sha256"):
        load(tmp_path, encoder(name, seed=1))


def test_token_classification_head():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **KW)
    pm = attach_classifier(BertForTokenClassification(cfg).eval(), PrefixConfig(prefix_length=2, reparam=False))
    ids, mask = _batch()
    labels = torch.randint(0, 3, ids.shape).masked_fill(mask == 0, -100)
    out = pm(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 7, 3)
    out.loss.backward()
    assert pm.base.classifier.weight.grad is not None


def test_deberta_with_talking_heads_is_refused_with_the_reason():
    """Talking heads mix the heads' attention scores, which the prefix's columns would have to join (the probe
    forward of attach meets it)."""
    from transformers import DebertaConfig, DebertaForSequenceClassification

    model = DebertaForSequenceClassification(DebertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=64,
                                                           pooler_hidden_size=32, talking_head=True))
    with pytest.raises(ValueError, match="talking_head=True"):
        attach_classifier(model, PrefixConfig(prefix_length=2))


def test_classification_metrics_against_hand_counts():
    preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    m = classification_metrics(preds, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # tp=2 fp=1 fn=1 tn=2: mcc = (2*2 - 1*1) / sqrt(3*3*3*3)
    assert m["mcc"] == pytest.approx(3 / 9)
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert classification_metrics([0, 1], [0, 1])["mcc"] == pytest.approx(1.0)
