"""Shims for attention computed inside a module of its own, outside transformers' attention interface.

While a prefix is attached, each listed module (``LEGACY_ATTENTION``: OpenAI GPT; XLM / FlauBERT; the classic
BERT self-attention of RemBERT, MegatronBERT, TAPAS and RoFormer; MPNet; DeBERTa v1, v2 and v3; LongT5's
encoder; MVP) gets one method replaced by the same arithmetic through the interface (``prefixtune_sdpa``,
registered by ``inject.py``), so that the wrapper there puts the prefix in front of its keys and values and
the probe of ``read_spec`` sees it.
Calls a shim does not cover (a cache that already holds tokens, cross-attention, decoders, EMD's separate
queries) run the module's own method. Position biases (MPNet's relative bias, DeBERTa's c2p / p2c) join the
additive mask over the real columns only: the prefix columns get content scores alone, as with T5.
With ``inject.py`` and ``cache.py``, one of the modules that reach into transformers' internals.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def self_attention_cache(cache: Any) -> Any:
    """The cache of a module's self-attention: ``cache`` itself, or the self-attention half of an
    ``EncoderDecoderCache`` (XLM, and BERT-style decoders such as RemBERT and MegatronBERT, keep one)."""
    return cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache


def _no_weights(module: nn.Module) -> ValueError:
    """The refusal of ``output_attentions`` by a shim (sdpa computes no attention weights)."""
    return ValueError(f"output_attentions is not available with prefixtune on {type(module).__name__} (its "
                      "attention runs through sdpa, which computes no weights)")


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 1/0 (or bool) mask as an additive one of ``dtype``: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed.bool(), torch.finfo(dtype).min)


def _openai_gpt_attn(module: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, output_attentions: bool = False) -> list[Any]:
    """OpenAI GPT's ``Attention._attn`` through the attention interface (``prefixtune_sdpa``), so that a prefix
    reaches it. q, v: (B, heads, T, d); k arrives transposed, (B, heads, d, T); its causal mask is the module's
    ``bias`` buffer (1/0, top-left), masked at -1e4 as the module does, plus the model's additive mask. Returns
    [(B, heads, T, d)] as the module's own does (the weights are not computed: sdpa)."""
    if output_attentions:
        raise _no_weights(module)
    t = q.shape[-2]
    mask = (1.0 - module.bias[:, :, :t, :t].to(q.dtype)) * -1e4
    if attention_mask is not None:
        mask = mask + attention_mask
    scaling = 1.0 / float(v.shape[-1]) ** 0.5 if module.scale else 1.0
    out, _ = ALL_ATTENTION_FUNCTIONS["prefixtune_sdpa"](
        module, q, k.transpose(-1, -2), v, mask, scaling=scaling,
        dropout=module.attn_dropout.p if module.training else 0.0)
    return [out.transpose(1, 2)]


def _bert_self_attention(outputs: str) -> Callable[..., Any]:
    """The classic BERT self-attention (RemBERT, MegatronBERT, TAPAS, RoFormer: ``query`` / ``key`` / ``value``
    projections, softmax(q k^T / sqrt(d) + additive mask) v, rotary first where ``sinusoidal_pos`` is given)
    through the attention interface, for encoder use: calls with a cache, cross-attention, decoders and
    ``output_attentions`` run the module's own forward. ``outputs``: "pair" returns (context, None) as the
    module returns (context, probs); "tuple" returns (context,). hidden_states: (B, T, hidden)."""
    def forward(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        own = type(module).forward
        bound = inspect.signature(own).bind(module, *args, **kwargs)
        a = bound.arguments
        extra = a.get("kwargs", {})
        if (getattr(module, "is_decoder", False) or a.get("encoder_hidden_states") is not None
                or a.get("past_key_values") is not None):
            return own(module, *args, **kwargs)
        if a.get("output_attentions") or extra.get("output_attentions"):
            raise _no_weights(module)
        hidden = a["hidden_states"]
        shape = (*hidden.shape[:-1], -1, module.attention_head_size)
        q, k, v = (proj(hidden).view(shape).transpose(1, 2) for proj in (module.query, module.key, module.value))
        pos = a.get("sinusoidal_pos")
        if pos is not None:  # RoFormer: rotary on q and k (and v where rotary_value), as its forward does
            rotated = module.apply_rotary_position_embeddings(pos, q, k, v) if module.rotary_value else \
                (*module.apply_rotary_position_embeddings(pos, q, k), v)
            q, k, v = rotated
        out, _ = ALL_ATTENTION_FUNCTIONS["prefixtune_sdpa"](
            module, q, k, v, a.get("attention_mask"), scaling=module.attention_head_size ** -0.5, is_causal=False,
            dropout=module.dropout.p if module.training else 0.0)
        context = out.reshape(*hidden.shape[:-1], -1)  # sdpa's output is (B, T, heads, d)
        return (context, None) if outputs == "pair" else (context,)
    return forward


def _mpnet_self_attention(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          position_bias: torch.Tensor | None = None, output_attentions: bool = False,
                          **kwargs: Any) -> tuple[torch.Tensor]:
    """MPNet's self-attention through the interface: its relative position bias (B|1, heads, T, T) joins the
    additive mask, so the prefix columns get none (they have no position, as T5's). Returns ((B, T, hidden),)
    after its output projection, as the module does."""
    if output_attentions:
        raise _no_weights(module)
    shape = (*hidden_states.shape[:-1], -1, module.attention_head_size)
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (module.q, module.k, module.v))
    mask = attention_mask
    if position_bias is not None:
        mask = position_bias if mask is None else mask + position_bias
    out, _ = ALL_ATTENTION_FUNCTIONS["prefixtune_sdpa"](
        module, q, k, v, mask, scaling=module.attention_head_size ** -0.5, is_causal=False,
        dropout=module.dropout.p if module.training else 0.0)
    return (module.o(out.reshape(*hidden_states.shape[:-1], -1)),)


def _xlm_attention(module: nn.Module, input: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor | None = None,
                   cache: Any = None, output_attentions: bool = False, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """XLM / FlauBERT's MultiHeadAttention through the interface for self-attention: mask (B, kv) of 1/0, or
    (B, q, kv) when the model is causal; the cache (the model always passes one) gets the layer's K/V as the
    module would put them there. Cross-attention runs its own forward. input: (B, T, dim).
    Returns ((B, T, dim),) after its output projection."""
    if kv is not None:
        return type(module).forward(module, input, mask, kv, cache, output_attentions, **kwargs)
    if output_attentions:
        raise _no_weights(module)
    shape = (*input.shape[:-1], module.n_heads, module.head_dim)
    q, k, v = (proj(input).view(shape).transpose(1, 2) for proj in (module.q_lin, module.k_lin, module.v_lin))
    own = self_attention_cache(cache)
    if own is not None:
        k, v = own.update(k, v, module.layer_id)
    allowed = (mask != 0)[:, None, None, :] if mask.dim() == 2 else (mask != 0)[:, None]
    out, _ = ALL_ATTENTION_FUNCTIONS["prefixtune_sdpa"](
        module, q, k, v, allowed, scaling=module.head_dim ** -0.5, is_causal=mask.dim() == 3,  # (B, q, kv): causal
        dropout=module.dropout if module.training else 0.0)
    return (module.out_lin(out.reshape(*input.shape[:-1], -1)),)


def _deberta_v2_attention(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                          output_attentions: bool = False, query_states: torch.Tensor | None = None,
                          relative_pos: torch.Tensor | None = None, rel_embeddings: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, None]:
    """DeBERTa-v2 / v3's disentangled self-attention through the interface: content-to-content scores scaled
    by sqrt(d * (1 + len(pos_att_type))), as its own; its disentangled bias (c2p, p2c) on the real columns joins
    the additive mask, so the prefix columns get content scores only (they have no position). EMD's separate
    query states run its own forward. hidden_states: (B, T, hidden); attention_mask: (B, 1, T, T) of 1/0.
    Returns ((B, T, heads * d), None)."""
    if query_states is not None:
        return type(module).forward(module, hidden_states, attention_mask, output_attentions, query_states,
                                    relative_pos, rel_embeddings)
    if output_attentions:
        raise _no_weights(module)
    b, t, _ = hidden_states.shape
    heads = module.num_attention_heads
    q, k, v = (module.transpose_for_scores(proj(hidden_states), heads)  # (B * heads, T, d)
               for proj in (module.query_proj, module.key_proj, module.value_proj))
    scale_factor = 1 + ("c2p" in module.pos_att_type) + ("p2c" in module.pos_att_type)
    mask = _additive(attention_mask, q.dtype)
    if module.relative_attention:
        rel = module.disentangled_attention_bias(q, k, relative_pos, module.pos_dropout(rel_embeddings), scale_factor)
        if rel is not None:
            mask = mask + rel.view(b, heads, t, t)
    d = q.shape[-1]
    out, _ = ALL_ATTENTION_FUNCTIONS["prefixtune_sdpa"](
        module, *(x.view(b, heads, t, d) for x in (q, k, v)), mask, scaling=(d * scale_factor) ** -0.5,
        is_causal=False, dropout=module.dropout.p if module.training else 0.0)
    return out.reshape(b, t, heads * d), None


def _deberta_attention(module: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                       output_attentions: bool = False, query_states: torch.Tensor | None = None,
                       relative_pos: torch.Tensor | None = None, rel_embeddings: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, None]:
    """DeBERTa (v1)'s disentangled self-attention through the interface: one fused projection plus its query
    and value biases, the query scaled by sqrt(d * (1 + len(pos_att_type))) first, as its own; its c2p / p2c
    bias on the real columns joins the additive mask. EMD's separate query states run its own forward; talking
    heads (which mix the heads' scores) are refused. hidden_states: (B, T, hidden); attention_mask: (B, 1, T, T)
    of 1/0. Returns ((B, T, heads * d), None)."""
    if query_states is not None:
        return type(module).forward(module, hidden_states, attention_mask, output_attentions, query_states,
                                    relative_pos, rel_embeddings)
    if module.head_logits_proj is not None:
        raise ValueError("DeBERTa with talking_head=True mixes the heads' attention scores; prefixtune does not "
                         "carry a prefix through that mixing")
    if output_attentions:
        raise _no_weights(module)
    q, k, v = module.transpose_for_scores(module.in_proj(hidden_states)).chunk(3, dim=-1)  # (B, heads, T, d)
    q = q + module.transpose_for_scores(module.q_bias[None, None, :])
    v = v + module.transpose_for_scores(module.v_bias[None, None, :])
    scale_factor = 1 + len(module.pos_att_type)
    q = q / torch.sqrt(torch.tensor(q.shape[-1], dtype=torch.float) * scale_factor).to(q.dtype)
    mask = _additive(attention_mask, q.dtype)
    if module.relative_attention and rel_embeddings is not None and relative_pos is not None:
        rel = module.disentangled_att_bias(q, k, relative_pos, module.pos_dropout(rel_embeddings), scale_factor)
        if rel is not None:
            mask = mask + rel
    out, _ = ALL_ATTENTION_FUNCTIONS["prefixtune_sdpa"](
        module, q, k, v, mask, scaling=1.0, is_causal=False, dropout=module.dropout.p if module.training else 0.0)
    return out.reshape(*hidden_states.shape[:-1], -1), None


def _longt5_encoder_attention(module: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor | None = None,
                              position_bias: torch.Tensor | None = None, output_attentions: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """LongT5's encoder attention (local, and transient-global) through the interface: the module's own blocks
    (each query block sees its 3 neighbouring key blocks, plus the global aggregates) become rows of one call,
    (B * blocks, heads, block_len, keys), so every query block also sees the prefix, which has no position
    (its columns get no bias). hidden_states: (B, T, d_model). Returns ((B, T, d_model), position_bias) as the
    module does, the bias without prefix columns (the next layers reuse it)."""
    if output_attentions:
        raise _no_weights(module)
    lt = sys.modules[type(module).__module__]  # the module's own block helpers
    b, t = hidden_states.shape[:2]
    heads, d, bl = module.n_heads, module.key_value_proj_dim, module.block_len

    def shape(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, -1, heads, d)

    q = lt._split_into_blocks(shape(module.q(hidden_states)), bl, dim=1)  # (B, blocks, bl, heads, d)
    k, v = (lt._concatenate_3_blocks(lt._split_into_blocks(shape(proj(hidden_states)), bl, dim=1), block_dim=1,
                                     sequence_dim=2) for proj in (module.k, module.v))  # (B, blocks, 3 bl, heads, d)
    transient = hasattr(module, "global_block_size")
    if transient:
        block_ids, segment_ids = lt._make_global_fixed_block_ids(
            mask if mask is not None else torch.ones(hidden_states.shape[:-1]), module.global_block_size)
        side = module.global_input_layer_norm(lt._create_global_aggregates(hidden_states, block_ids,
                                                                            segment_ids.shape[-1]))
        k, v = (torch.cat([x, shape(proj(side)).unsqueeze(1).expand(-1, x.shape[1], -1, -1, -1)], dim=2)
                for x, proj in ((k, module.k), (v, module.v)))
    if position_bias is None:  # as the module builds it (the first layer; the others get it passed)
        if module.has_relative_attention_bias:
            position_bias = module.compute_bias(bl)
        else:
            position_bias = torch.zeros((1, 1, heads, bl, 3 * bl), device=q.device, dtype=q.dtype)
        local = mask
        if transient and mask is not None:
            local = lt._get_local_attention_mask(mask, bl, hidden_states.device)
        if local is not None:
            position_bias = position_bias + torch.where(local > 0, 0.0, -1e10).transpose(1, 2)
        if transient:
            full = mask if mask is not None else torch.ones(b, t)
            side_bias = lt._split_into_blocks(module.compute_side_bias(full, segment_ids), bl, dim=-2).transpose(1, 2)
            position_bias = torch.cat([position_bias.type(q.dtype), side_bias.type(q.dtype).to(q.device)], dim=-1)
    blocks, keys = q.shape[1], k.shape[2]
    q, k, v = (x.permute(0, 1, 3, 2, 4).reshape(b * blocks, heads, -1, d) for x in (q, k, v))
    bias = position_bias.to(q.dtype).expand(b, blocks, heads, bl, keys).reshape(b * blocks, heads, bl, keys)
    out, _ = ALL_ATTENTION_FUNCTIONS["prefixtune_sdpa"](
        module, q, k, v, bias, scaling=1.0, is_causal=False, dropout=module.dropout if module.training else 0.0)
    out = out.reshape(b, blocks * bl, heads * d)[:, :t]  # sdpa's output is (B * blocks, bl, heads, d)
    return module.o(out), position_bias


def _mvp_attention(module: nn.Module, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None,
                   past_key_values: Any = None, attention_mask: torch.Tensor | None = None,
                   attn_prompt: torch.Tensor | None = None, output_attentions: bool = False, **kwargs: Any
                   ) -> tuple[torch.Tensor, None]:
    """MVP's BART-style attention (self and cross, with its cache, as its own) through the interface. Its own
    task prompts (``attn_prompt``) stay in front of the keys, always visible, as the module puts them; the
    prefix goes before them. hidden_states: (B, T, d_model). Returns ((B, T, d_model), None)."""
    if output_attentions:
        raise _no_weights(module)
    b, t, _ = hidden_states.shape
    heads, d = module.num_heads, module.head_dim
    cross = key_value_states is not None
    own = past_key_values
    if isinstance(past_key_values, EncoderDecoderCache):
        own = past_key_values.cross_attention_cache if cross else past_key_values.self_attention_cache
    if cross and own is not None and past_key_values.is_updated.get(module.layer_idx):
        k, v = own.layers[module.layer_idx].keys, own.layers[module.layer_idx].values
    else:
        states = key_value_states if cross else hidden_states
        k, v = (proj(states).view(b, -1, heads, d).transpose(1, 2) for proj in (module.k_proj, module.v_proj))
        if own is not None:
            k, v = own.update(k, v, module.layer_idx)
            if cross and isinstance(past_key_values, EncoderDecoderCache):
                past_key_values.is_updated[module.layer_idx] = True
    if attn_prompt is not None:
        k = torch.cat([attn_prompt[0].expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([attn_prompt[1].expand(b, -1, -1, -1), v], dim=2)
        if attention_mask is not None:
            zeros = attention_mask.new_zeros(b, 1, t, attn_prompt[0].shape[1])
            attention_mask = torch.cat([zeros, attention_mask], dim=-1)
    q = module.q_proj(hidden_states).view(b, t, heads, d).transpose(1, 2)
    causal = {} if attention_mask is not None else {"is_causal": False}  # no mask: nothing to block (encoder)
    out, _ = ALL_ATTENTION_FUNCTIONS["prefixtune_sdpa"](
        module, q, k, v, attention_mask, scaling=module.scaling, dropout=module.dropout if module.training else 0.0,
        **causal)
    return module.out_proj(out.reshape(b, t, heads * d)), None


#: Attention modules that compute attention inside themselves, each routed through the interface by a shim
#: that replaces one method with the same arithmetic (module class path -> (method, shim)).
LEGACY_ATTENTION: dict[str, tuple[str, Callable[..., Any]]] = {
    "transformers.models.openai.modeling_openai.Attention": ("_attn", _openai_gpt_attn),
    "transformers.models.rembert.modeling_rembert.RemBertSelfAttention": ("forward", _bert_self_attention("pair")),
    "transformers.models.megatron_bert.modeling_megatron_bert.MegatronBertSelfAttention":
        ("forward", _bert_self_attention("pair")),
    "transformers.models.tapas.modeling_tapas.TapasSelfAttention": ("forward", _bert_self_attention("tuple")),
    "transformers.models.roformer.modeling_roformer.RoFormerSelfAttention": ("forward", _bert_self_attention("pair")),
    "transformers.models.mpnet.modeling_mpnet.MPNetSelfAttention": ("forward", _mpnet_self_attention),
    "transformers.models.deberta_v2.modeling_deberta_v2.DisentangledSelfAttention": ("forward", _deberta_v2_attention),
    "transformers.models.deberta.modeling_deberta.DisentangledSelfAttention": ("forward", _deberta_attention),
    "transformers.models.mvp.modeling_mvp.MvpAttention": ("forward", _mvp_attention),
    "transformers.models.longt5.modeling_longt5.LongT5LocalAttention": ("forward", _longt5_encoder_attention),
    "transformers.models.longt5.modeling_longt5.LongT5TransientGlobalAttention":
        ("forward", _longt5_encoder_attention),
    "transformers.models.xlm.modeling_xlm.MultiHeadAttention": ("forward", _xlm_attention),
    "transformers.models.flaubert.modeling_flaubert.MultiHeadAttention": ("forward", _xlm_attention),
}


def install_shims(model: nn.Module) -> list[nn.Module]:
    """Route ``model``'s legacy attention modules (``LEGACY_ATTENTION``) through the interface; returns them.
    The ``prefixtune_sdpa`` function they call must be registered first (``inject.register_attention``)."""
    shimmed = []
    for m in model.modules():
        entry = LEGACY_ATTENTION.get(f"{type(m).__module__}.{type(m).__name__}")
        if entry is not None and entry[0] not in m.__dict__:
            setattr(m, entry[0], partial(entry[1], m))
            shimmed.append(m)
    return shimmed


def remove_shims(modules: list[nn.Module]) -> None:
    """Give shimmed modules their own method back."""
    for m in modules:
        m.__dict__.pop(LEGACY_ATTENTION[f"{type(m).__module__}.{type(m).__name__}"][0], None)
