"""Independent reference computations: attention written out by hand with the prefix K/V in front."""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def _rms(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + norm.variance_epsilon) * norm.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


@contextmanager
def attention_calls(model, spec):
    """Within the block, record each prefix-carrying attention module's last call: {(stack, layer): (its
    arguments by name, in signature order, extra keyword arguments after them; its output[0])}."""
    records = {}
    modules = dict(model.named_modules())

    def hook_for(slot):
        def hook(mod, args, kwargs, output):
            call = dict(inspect.signature(type(mod).forward).bind(mod, *args, **kwargs).arguments)
            call.pop("self", None)
            extra = call.pop("kwargs", {})
            records[slot] = ({**call, **{k: v for k, v in extra.items() if k not in call}}, output[0])

        return hook

    handles = [modules[path].register_forward_hook(hook_for((stack, layer)), with_kwargs=True)
               for path, stack, layer in spec.slots]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def _attend(q, k, v, allowed, scale, bias=None):
    """q (B,H,q,d); k,v (B,H,kv,d); allowed (B|1,1,q,kv) bool."""
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~allowed, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


@torch.no_grad()
def llama_logits(model, ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
    """Logits of a Llama-family model on ``ids`` (B, T) with prefix (P, layers·2·kv_dim).

    Real tokens sit at positions P..P+T-1, as after P cached tokens; every token sees the
    whole prefix and, causally, the real tokens.
    """
    cfg = model.config
    inner = model.model
    b, t = ids.shape
    heads, kvh = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    p = prefix.shape[0]
    kv = prefix.view(p, cfg.num_hidden_layers, 2, kvh, hd)
    x = inner.embed_tokens(ids)
    pos = (torch.arange(t) + p)[None].expand(b, t)
    cos, sin = inner.rotary_emb(x, pos)
    cos, sin = cos[:, None], sin[:, None]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    allowed = torch.cat([torch.ones(t, p, dtype=torch.bool), causal], dim=1)[None, None]
    for layer_idx, layer in enumerate(inner.layers):
        att = layer.self_attn
        h = _rms(x, layer.input_layernorm)
        q = att.q_proj(h).view(b, t, heads, hd).transpose(1, 2)
        k = att.k_proj(h).view(b, t, kvh, hd).transpose(1, 2)
        v = att.v_proj(h).view(b, t, kvh, hd).transpose(1, 2)
        if hasattr(att, "q_norm"):
            q, k = _rms(q, att.q_norm), _rms(k, att.k_norm)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        pk = kv[:, layer_idx, 0].permute(1, 0, 2)[None].expand(b, -1, -1, -1)
        pv = kv[:, layer_idx, 1].permute(1, 0, 2)[None].expand(b, -1, -1, -1)
        k = torch.cat([pk, k], dim=2).repeat_interleave(heads // kvh, dim=1)
        v = torch.cat([pv, v], dim=2).repeat_interleave(heads // kvh, dim=1)
        o = _attend(q, k, v, allowed, 1 / math.sqrt(hd))
        x = x + att.o_proj(o.transpose(1, 2).reshape(b, t, heads * hd))
        h = _rms(x, layer.post_attention_layernorm)
        mlp = layer.mlp
        x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
    return model.lm_head(_rms(x, inner.norm))


def seq2seq_attention(module, kind: str, hidden, other, prefix_kv, allowed_real, bias=None):
    """One BART/T5 attention call by hand.

    hidden (B, q, d) queries' input; other (B, kv, d) keys' input (= hidden for self-attention);
    prefix_kv (P, 2, H, hd); allowed_real (B|1, 1, q, kv) bool for the real keys;
    bias (1, H, q, kv) T5 position bias for the real keys. Returns (B, q, d).
    """
    b, q_len, _ = hidden.shape
    if kind == "bart":
        hd, heads = module.head_dim, module.num_heads
        q = module.q_proj(hidden) * module.scaling
        k, v = module.k_proj(other), module.v_proj(other)
        out = module.out_proj
        scale = 1.0
    else:
        hd, heads = module.key_value_proj_dim, module.n_heads
        q, k, v, out = module.q(hidden), module.k(other), module.v(other), module.o
        scale = 1.0
    q = q.view(b, q_len, heads, hd).transpose(1, 2)
    k = k.view(b, -1, heads, hd).transpose(1, 2)
    v = v.view(b, -1, heads, hd).transpose(1, 2)
    p = prefix_kv.shape[0]
    pk = prefix_kv[:, 0].permute(1, 0, 2)[None].expand(b, -1, -1, -1)
    pv = prefix_kv[:, 1].permute(1, 0, 2)[None].expand(b, -1, -1, -1)
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    allowed = torch.cat([torch.ones(*allowed_real.shape[:-1], p, dtype=torch.bool), allowed_real], dim=-1)
    if bias is not None:
        bias = torch.cat([torch.zeros(*bias.shape[:-1], p), bias], dim=-1)
    o = _attend(q, k, v, allowed, scale, bias)
    return out(o.transpose(1, 2).reshape(b, q_len, heads * hd))


# ----------------------------------------------------------------------------- the real-token rule


class IdTokenizer:
    """A tokenizer stand-in for ``init="text:..."``: one id per character, ``offset + ord(c) % span``."""

    def __init__(self, offset: int = 4, span: int = 80):
        self.offset, self.span = offset, span

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return {"input_ids": torch.tensor([[self.offset + ord(c) % self.span for c in text]])}


INIT_WORDS = "ab:c"  # t0, four tokens


@torch.no_grad()
def greedy_by_forward(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """(1, new_tokens) greedy tokens after ``ids`` (1, T), each from a full forward of everything so far."""
    out = ids
    for _ in range(new_tokens):
        out = torch.cat([out, model(input_ids=out).logits[:, -1:].argmax(-1)], dim=1)
    return out[:, ids.shape[1]:]


def numbers_positions_from_padding_idx(model) -> bool:
    """RoBERTa-like embeddings: their forward numbers positions from padding_idx + 1, while transformers'
    generate passes 0, 1, ...: the base model's own generate and forward disagree on [t0; x]."""
    return any(hasattr(m, "create_position_ids_from_input_ids") for m in model.modules())


@torch.no_grad()
def real_token_equivalence(model, x_len: int = 5, new_tokens: int = 4, atol: float = 1e-4) -> dict:
    """Check the rule on ``model``: a flat prefix initialized from the frozen model's own K/V of t0 gives

    - the logits of x that the base model gives for x after [t0; x], and
    - the greedy continuation of x that the base model gives for [t0; x] (``generate``; for models whose
      generate numbers positions unlike their forward, the greedy tokens of repeated full forwards).

    Raises AssertionError on a mismatch; returns {"max_logit_diff": float, "tokens": list}.
    """
    from prefixtune import PrefixConfig, attach

    tok = IdTokenizer()
    device = next(model.parameters()).device  # the check runs where the model is (the CUDA tests)
    t0 = tok(INIT_WORDS)["input_ids"].to(device)
    x = torch.randint(4, 84, (1, x_len), generator=torch.Generator().manual_seed(3)).to(device)
    full = torch.cat([t0, x], dim=1)
    ref_logits = model(input_ids=full).logits[:, t0.shape[1]:].float()
    kw = {"max_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    if numbers_positions_from_padding_idx(model):
        ref_tokens = greedy_by_forward(model, full, new_tokens)
    else:
        ref_tokens = model.generate(input_ids=full, attention_mask=torch.ones_like(full), **kw)[:, full.shape[1]:]
    alone = model(input_ids=x).logits.float()  # x without t0: the prefix must make a difference
    pm = attach(model, PrefixConfig(init=f"text:{INIT_WORDS}", reparam=False), tok)
    try:
        logits = pm(input_ids=x).logits.float()
        tokens = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)[:, x.shape[1]:]
    finally:
        pm.detach()
    diff = float((logits - ref_logits).abs().max())
    assert diff <= atol * max(1.0, float(ref_logits.abs().max())), f"logits differ by {diff}"
    assert torch.equal(tokens, ref_tokens), f"greedy {tokens.tolist()} != base after t0 {ref_tokens.tolist()}"
    assert float((alone - ref_logits).abs().max()) > 100 * diff, "t0 does not change the logits: the check is void"
    return {"max_logit_diff": diff, "tokens": tokens[0].tolist()}


@torch.no_grad()
def seq2seq_contract(model, new_tokens: int = 3, atol: float = 1e-5) -> dict:
    """Check an encoder-decoder's prefixes (the contract where no real-token rule exists: encoder tokens would
    see real prefix tokens' own states change with x):

    - encoder self-, decoder self- and cross-attention each carry a prefix (three stacks);
    - disabled, the prefixed model gives the base model's logits;
    - a right-padded source row gives the logits of the row alone, and the prefix changes the logits;
    - cached greedy ``generate`` gives the tokens of full recomputation without a cache.

    Raises AssertionError on a mismatch; returns {"padded_row": float, "change": float, "tokens": list}.
    """
    from prefixtune import PrefixConfig, attach

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 84, (2, 6), generator=g)
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    dec = torch.randint(4, 84, (2, 4), generator=g)
    base = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    try:
        stacks = [s.name for s in pm.spec.stacks]
        assert pm.spec.kind == "seq2seq" and stacks == ["encoder", "decoder", "cross"], (pm.spec.kind, stacks)
        with pm.disabled():
            off = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert torch.allclose(off, base, atol=atol, rtol=1e-4), "disabled prefix changes the logits"
        for sp in pm.prefix.stacks.values():
            sp.table.normal_(0, 0.5, generator=g)
        both = pm(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        alone = pm(input_ids=ids[1:, :3], attention_mask=mask[1:, :3], decoder_input_ids=dec[1:]).logits
        pad, change = float((both[1:] - alone).abs().max()), float((both - base).abs().max())
        assert pad <= atol * max(1.0, float(alone.abs().max())), f"padded row differs by {pad}"
        assert change > 1e-3, "the prefix does not change the logits"
        out = pm.generate(input_ids=ids[:1], max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
        seq = out[:, :1]
        for _ in range(new_tokens):
            step = pm(input_ids=ids[:1], decoder_input_ids=seq, use_cache=False).logits[:, -1:]
            seq = torch.cat([seq, step.argmax(-1)], dim=1)
        assert torch.equal(out, seq), f"cached generate {out.tolist()} != recomputation {seq.tolist()}"
    finally:
        pm.detach()
    return {"padded_row": pad, "change": change, "tokens": out[0].tolist()}
