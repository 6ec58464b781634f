"""What a supported model looks like: its attention stacks, their layers and K/V shapes.

``read_spec(model)`` finds them by mechanism, not by name: it runs the model once on three
tokens with a recording attention function (``inject.record_attention_calls``) and reads,
for every call of transformers' attention interface, which module made it and the key and value
tensors' heads and head dims (GQA, explicit or per-layer head_dim, fused QKV, MLA's differing K
and V dims, q/k norms and partial RoPE are all already applied there). Any attention module that
goes through ``ALL_ATTENTION_FUNCTIONS`` can carry a prefix; the rest is refused with the reason.
Everything else uses the ``ModelSpec``.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prefixtune.core.inject import (
    AttentionCall,
    padding_moves_cached_positions,
    record_attention_calls,
    record_cache_shapes,
    stateful_cache_layers,
)

Kind = Literal["causal", "seq2seq", "encoder"]
Route = Literal["attention", "cache"]
Stack = Literal["encoder", "decoder", "cross"]
LayerDims = tuple[int, int, int, int]  # (key heads, key head_dim, value heads, value head_dim)

# Families whose attention is not written against transformers' attention interface: the reason each
# is refused (checked by the tests; the probe would find no attention calls in them).
NOT_INTERFACE = ("computes attention inside its own module, not through transformers' attention interface "
                 "(ALL_ATTENTION_FUNCTIONS), so prefixtune cannot put prefix keys/values in front of its keys")
RECURRENT = ("has recurrent (Mamba / linear-attention / convolution) layers whose state a prefix cannot set: "
             "K/V in front of its attention layers would not act as real past tokens, so it is refused")

CACHE_STATE = ("keeps a convolution / recurrent state beside the keys and values of its attention layers' cache "
               "(its queries and keys mix the previous tokens through a causal convolution, its values carry the "
               "previous token's projection): real past tokens set that state, a prefix of keys and values cannot, "
               "so it is refused")

NOT_CAUSAL = ("lets a position's output depend on later tokens in its own forward (the first position's output "
              "changes when the tokens after it do): as transformers builds it, it is not a causal language model, so "
              "a causal loss would see its labels and no prefix can act as P past tokens of a sequence that sees "
              "ahead; it is refused")


@dataclass(frozen=True)
class StackSpec:
    """One attention stack that can carry a prefix (e.g. the decoder's self-attention).

    ``num_kv_heads`` / ``head_dim`` are those of every layer when the stack is uniform; otherwise
    ``layer_dims`` gives each layer's (key heads, key dim, value heads, value dim) and the prefix of
    one position is laid out layer by layer as [keys (heads·dim), values (heads·dim)].
    """

    name: Stack
    num_layers: int
    num_kv_heads: int
    head_dim: int
    layer_dims: tuple[LayerDims, ...] = ()

    @property
    def uniform(self) -> bool:
        """Every layer has the same heads and head dim for keys and values: (P, layers, 2, heads, dim)."""
        return not self.layer_dims

    def dims(self, layer: int) -> LayerDims:
        if self.layer_dims:
            return self.layer_dims[layer]
        return self.num_kv_heads, self.head_dim, self.num_kv_heads, self.head_dim

    @property
    def kv_dim(self) -> int:
        """num_kv_heads × head_dim: the width of one key (or value) vector (uniform stacks)."""
        if not self.uniform:
            raise ValueError(f"the '{self.name}' stack's layers differ in K/V shapes {self.layer_dims}: no one kv_dim")
        return self.num_kv_heads * self.head_dim

    @property
    def width(self) -> int:
        """The width of one prefix position across the whole stack (layers · 2 · kv_dim when uniform)."""
        return sum(kh * kd + vh * vd for kh, kd, vh, vd in (self.dims(i) for i in range(self.num_layers)))

    def layer_slices(self, layer: int) -> tuple[tuple[int, int], tuple[int, int], LayerDims]:
        """Column ranges of ``layer``'s keys and values in a flat (…, width) prefix, and its dims."""
        start = sum(kh * kd + vh * vd for kh, kd, vh, vd in (self.dims(i) for i in range(layer)))
        kh, kd, vh, vd = self.dims(layer)
        mid = start + kh * kd
        return (start, mid), (mid, mid + vh * vd), (kh, kd, vh, vd)


@dataclass(frozen=True)
class ModelSpec:
    """The values ``prefixtune`` needs from a base model, read once by ``read_spec``."""

    model_type: str
    architecture: str
    kind: Kind
    stacks: tuple[StackSpec, ...]
    hidden_size: int
    vocab_size: int
    shift_positions: bool
    slots: tuple[tuple[str, Stack, int], ...]  # (module path, stack, layer); () on the cache route
    route: Route = "attention"  # "cache": the prefix is the first P positions of the model's own KV cache
    # RoBERTa-like embeddings number a row's tokens padding_idx + 1, + 2, ... (padding takes padding_idx), where
    # transformers' generate passes 0, 1, ...: PrefixModel.generate passes the model's own numbering (None: not so)
    position_padding_idx: int | None = None
    # Cache route: False where the model numbers key positions by index (MPT's ALiBi, RoFormer): the pads of a
    # left-padded row would sit between the prefix and its tokens, so such batches are refused at the call
    left_padding_exact: bool = True
    # Cache route: the model's forward takes position_ids; a call without them gets them from the attention mask
    # (padding takes no position), as generate's are, and shifted by P
    cache_position_ids: bool = False

    def stack(self, name: str) -> StackSpec:
        for s in self.stacks:
            if s.name == name:
                return s
        raise KeyError(f"{self.architecture} has no '{name}' attention stack (has {[s.name for s in self.stacks]})")


_ENC_LEN, _DEC_LEN = 3, 2  # probe lengths; different, so that cross-attention is told by its key length
_CACHE: weakref.WeakKeyDictionary[nn.Module, ModelSpec] = weakref.WeakKeyDictionary()


def _text_config(cfg: Any) -> Any:
    getter = getattr(cfg, "get_text_config", None)
    return getter() if callable(getter) else cfg


def _probe_ids(model: nn.Module, length: int) -> torch.Tensor:
    """(1, length) ids of ordinary tokens: no special, image or pad id of the config."""
    cfg = model.config
    vocab = model.get_input_embeddings().num_embeddings
    special = set()
    for c in (cfg, _text_config(cfg)):
        for key, value in c.to_dict().items():
            if isinstance(value, int) and ("token" in key or key.endswith("_id") or key.endswith("_index")):
                special.add(value)
    ids = [i for i in range(3, vocab) if i not in special][:length]
    device = next(model.parameters()).device
    return torch.tensor([ids], device=device)


def _refuse_recurrent(model: nn.Module, name: str, model_type: str) -> None:
    cfg = _text_config(model.config)
    types = set(getattr(cfg, "layer_types", None) or [])
    # indexed sparse attention (DeepSeek V3.2, GLM DSA): its indexer picks among the real keys; the prefix stays
    # visible to every query (docs/support.md)
    attention_like = {"indexed_attention", "full_attention", "sliding_attention", "attention", "chunked_attention",
                      "global", "local", "sliding_window", "full", "hybrid", "hybrid_sliding",
                      "compressed_sparse_attention", "heavily_compressed_attention"}
    recurrent = sorted(t for t in types if isinstance(t, str) and t not in attention_like)
    kinds = ("Mamba", "Mixer", "LinearAttention", "GatedDeltaNet", "ShortConv", "SSM", "Recurrent", "Retention")
    classes = sorted({type(m).__name__ for m in model.modules() if any(k in type(m).__name__ for k in kinds)})
    if recurrent or classes:
        found = recurrent or classes
        raise ValueError(f"{name} (model_type={model_type!r}) {RECURRENT} (found {found[:4]})")
    stateful = stateful_cache_layers(model)
    if stateful:
        raise ValueError(f"{name} (model_type={model_type!r}) {CACHE_STATE} (its cache layers: {stateful})")


def _stack_of(call: AttentionCall, path: str, kind: Kind, encoder_paths: set[str]) -> Stack:
    if kind == "encoder":
        return "encoder"
    if kind == "causal":
        return "decoder"
    if any(path == e or path.startswith(e + ".") for e in encoder_paths):
        return "encoder"
    if path.rsplit(".", 1)[-1] in _CROSS_NAMES:  # keys may hold more than the source (MVP's own prompts)
        return "cross"
    return "cross" if call.kv_len == _ENC_LEN and call.q_len == _DEC_LEN else "decoder"


_CROSS_NAMES = {"encoder_attn", "EncDecAttention", "cross_attn", "crossattention"}  # transformers' own names


def _stack_spec(name: Stack, dims: list[LayerDims]) -> StackSpec:
    kh, kd = dims[0][:2]
    uniform = all(d == (kh, kd, kh, kd) for d in dims)
    return StackSpec(name, len(dims), kh, kd, () if uniform else tuple(dims))


def _takes_position_ids(model: nn.Module, seq2seq: bool) -> bool:
    """Decoder-only models are shifted by P through ``position_ids``; a forward without it counts positions
    from its cache (BART's decoder as a causal LM, TrOCR), and so do RoBERTa-like embeddings (their own
    padding offset): those take the cache route."""
    if seq2seq or not callable(getattr(model, "forward", None)):
        return True
    if any(hasattr(m, "create_position_ids_from_input_ids") for m in model.modules()):
        return False  # RoBERTa-like: positions are padding_idx + 1 + count, given position_ids skip the offset
    return "position_ids" in inspect.signature(model.forward).parameters


def _cache_route_spec(model: nn.Module, name: str, model_type: str, seq2seq: bool, inputs: dict[str, Any]
                      ) -> ModelSpec:
    """The second route, for decoder-only models: the prefix as P past positions of the model's own cache."""
    generates = callable(getattr(model, "can_generate", None)) and model.can_generate()  # a LM, not an encoder
    if not seq2seq and generates and _sees_later_tokens(model, inputs["input_ids"]):
        raise ValueError(f"{name} (model_type={model_type!r}) {NOT_CAUSAL}")
    dims = [] if seq2seq else record_cache_shapes(model, **inputs)
    if not dims:
        raise ValueError(f"{name} (model_type={model_type!r}) {NOT_INTERFACE}, and it keeps no standard "
                         "per-layer KV cache (DynamicCache) to carry the prefix instead")
    emb = model.get_input_embeddings()
    padding_idx = _position_padding_idx(model)
    position_ids = padding_idx is None and "position_ids" in inspect.signature(model.forward).parameters
    return ModelSpec(
        model_type=model_type, architecture=name, kind="causal", stacks=(_stack_spec("decoder", dims),),
        hidden_size=emb.embedding_dim,
        vocab_size=int(getattr(_text_config(model.config), "vocab_size", None) or emb.num_embeddings),
        shift_positions=True, slots=(), route="cache", position_padding_idx=padding_idx,
        left_padding_exact=not padding_moves_cached_positions(model, _probe_ids(model, 3), position_ids),
        cache_position_ids=position_ids,
    )


@torch.no_grad()
def _sees_later_tokens(model: nn.Module, ids: torch.Tensor) -> bool:
    """Whether the output at the first of ``ids`` (1, n >= 2) changes at all when every later token does.

    A causal LM's cannot: the same first token, run through kernels chosen by shape alone, gives the same bits
    whatever follows it (masked keys weigh exactly 0). CPM-Ant's forward attends both ways over its whole input;
    ProphetNet's predict streams, as transformers computes them, gather their relative position bias from other
    positions' hidden states (a reshape that mixes the positions), which moves its first logits by 1e-7 to 6e-7
    at a tiny model's initialization: hence bits, not a tolerance."""
    other = ids.clone()
    other[0, 1:] = ids[0, 0]  # another ordinary token: the probe ids are distinct
    was_training = model.training
    model.eval()
    try:
        first = [model(input_ids=x, use_cache=False)[0][0, 0] for x in (ids, other)]
    finally:
        model.train(was_training)
    return not torch.equal(first[0], first[1])


def _position_padding_idx(model: nn.Module) -> int | None:
    """The padding_idx from which RoBERTa-like embeddings count positions (their own, not generate's), or None."""
    for m in model.modules():
        if hasattr(m, "create_position_ids_from_input_ids") and isinstance(getattr(m, "padding_idx", None), int):
            return int(m.padding_idx)
    return None


def cache_mismatch(model: nn.Module) -> str | None:
    """Why ``model``'s own KV cache cannot carry its prefix as P past positions (None: it can): the cache
    holds other shapes than the attention reads, as multi-head latent attention caches a compressed latent.
    Cache-route models carry their prefix there by construction."""
    spec = read_spec(model)
    if spec.route == "cache" or spec.kind != "causal":
        return None
    stack = spec.stack("decoder")
    cached = record_cache_shapes(model, input_ids=_probe_ids(model, 3))
    read = [stack.dims(i) for i in range(stack.num_layers)]
    if cached == read:
        return None
    if not cached:
        why = "keeps no standard per-layer cache (DynamicCache layers of keys and values)"
    elif len(cached) != len(read):
        why = (f"caches {len(cached)} layers for its {len(read)} attention layers (layers that reuse another "
               "layer's K/V, as Gemma 3n's do)")
    else:
        diff = next(i for i, (c, r) in enumerate(zip(cached, read, strict=True)) if c != r)
        why = (f"holds other shapes than its attention reads (layer {diff}: (key heads, key dim, value heads, "
               f"value dim) {cached[diff]} cached, {read[diff]} read; multi-head latent attention caches a "
               "compressed latent, JetMoE fewer heads)")
    return (f"{spec.architecture}'s KV cache {why}, so a prefix cannot be written into it as P past positions")


def read_spec(model: nn.Module) -> ModelSpec:
    """Find every prefix-carrying attention layer of ``model`` and its K/V shapes (cached per model).

    Raises ValueError naming the class and the reason when ``model`` cannot carry a prefix exactly.
    """
    cached = _CACHE.get(model)
    if cached is not None:
        return cached
    spec = _read_spec(model)
    _CACHE[model] = spec
    return spec


def _read_spec(model: nn.Module) -> ModelSpec:
    cfg = getattr(model, "config", None)
    model_type = str(getattr(cfg, "model_type", None))
    name = type(model).__name__
    if cfg is None or not hasattr(model, "get_input_embeddings"):
        raise ValueError(f"{name} is not a transformers model (it has no config / input embeddings)")
    try:
        emb = model.get_input_embeddings()
    except NotImplementedError:
        emb = None
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"{name} (model_type={model_type!r}) has no token embedding table (its input embeddings are "
                         f"{type(emb).__name__}, not an nn.Embedding): prefixtune reads the vocabulary and the "
                         "width from it, so this family is refused")
    _refuse_recurrent(model, name, model_type)
    seq2seq = bool(getattr(cfg, "is_encoder_decoder", False))
    inputs: dict[str, Any] = {"input_ids": _probe_ids(model, _ENC_LEN)}
    if seq2seq:
        inputs["decoder_input_ids"] = _probe_ids(model, _DEC_LEN)
    try:
        calls = record_attention_calls(model, **inputs)
    except (RuntimeError, IndexError, TypeError) as err:  # the family's own forward, on a short probe input
        raise ValueError(f"{name} (model_type={model_type!r}): the probe forward that reads its attention layers "
                         f"failed on input_ids of shape {tuple(inputs['input_ids'].shape)}, so it is refused: "
                         f"{type(err).__name__}: {err}") from err
    if not calls:
        return _cache_route_spec(model, name, model_type, seq2seq, inputs)
    paths = {id(m): p for p, m in model.named_modules()}
    if seq2seq:
        kind: Kind = "seq2seq"
    else:
        kind = "causal" if all(c.causal for c in calls) else "encoder"
        if any(c.causal for c in calls) and kind == "encoder":
            raise ValueError(f"{name}: some attention layers are causal and some are not; prefixtune needs one kind")
        # The cache route where positions do not come from position_ids, or where one module makes several
        # attention calls (DiffLlama's two softmaxes over one K and a split V): the model's cache holds that
        # layer's K/V once, before the module derives its calls' inputs from them.
        if kind == "causal" and (not _takes_position_ids(model, seq2seq)
                                 or len({id(c.module) for c in calls}) < len(calls)):
            return _cache_route_spec(model, name, model_type, seq2seq, inputs)
    encoder_paths: set[str] = set()
    if seq2seq:
        encoder = model.get_encoder()
        encoder_paths = {p for p, m in model.named_modules() if m is encoder}
    seen: set[int] = set()
    slots: list[tuple[str, Stack, int]] = []
    dims: dict[Stack, list[LayerDims]] = {}
    for call in calls:
        if id(call.module) in seen and kind != "encoder":
            raise ValueError(f"{name}: {paths[id(call.module)]} is called more than once per forward (shared "
                             "layers); a prefix per call would need one module per call, so it is refused")
        seen.add(id(call.module))  # an encoder's shared module (ALBERT) gets one slot per call, in call order
        path = paths[id(call.module)]
        stack = _stack_of(call, path, kind, encoder_paths)
        layer_dims = dims.setdefault(stack, [])
        slots.append((path, stack, len(layer_dims)))
        layer_dims.append((call.k_heads, call.k_dim, call.v_heads, call.v_dim))
    order = ("encoder", "decoder", "cross")
    if seq2seq and set(dims) != set(order):
        missing = [s for s in order if s not in dims]
        raise ValueError(f"{name} (model_type={model_type!r}): its {' and '.join(missing)} attention does not go "
                         "through transformers' attention interface (ALL_ATTENTION_FUNCTIONS), so that stack would "
                         "carry no prefix; an encoder-decoder needs all three (encoder, decoder, cross), so it is "
                         "refused")
    stacks = tuple(_stack_spec(s, dims[s]) for s in order if s in dims)  # type: ignore[arg-type]
    emb = model.get_input_embeddings()
    return ModelSpec(
        model_type=model_type,
        architecture=name,
        kind=kind,
        stacks=stacks,
        hidden_size=emb.embedding_dim,
        vocab_size=int(getattr(_text_config(cfg), "vocab_size", None) or emb.num_embeddings),
        shift_positions=kind == "causal",
        slots=tuple(slots),
    )
