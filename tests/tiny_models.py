"""Tiny random models built from configs (no downloads), one per supported architecture, and a tokenizer.

Imported by tests as ``from tiny_models import ...`` (``tests/`` is on pytest's pythonpath)."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 96


def _llama(attn: str) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn)
    return LlamaForCausalLM(cfg)


def _qwen3(attn: str) -> torch.nn.Module:
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn)
    return Qwen3ForCausalLM(cfg)


def _qwen2(attn: str) -> torch.nn.Module:
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn)
    return Qwen2ForCausalLM(cfg)


def _mistral(attn: str) -> torch.nn.Module:
    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                        sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                        attn_implementation=attn)
    return MistralForCausalLM(cfg)


def _gpt2(attn: str) -> torch.nn.Module:
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation=attn)
    return GPT2LMHeadModel(cfg)


def _bart(attn: str) -> torch.nn.Module:
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
                     attn_implementation=attn)
    return BartForConditionalGeneration(cfg)


def _t5(attn: str) -> torch.nn.Module:
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   pad_token_id=0, eos_token_id=2, decoder_start_token_id=0, attn_implementation=attn)
    return T5ForConditionalGeneration(cfg)


BUILDERS = {
    "llama": _llama,
    "qwen3": _qwen3,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "gpt2": _gpt2,
    "bart": _bart,
    "t5": _t5,
}
CAUSAL = ["llama", "qwen3", "qwen2", "mistral", "gpt2"]
SEQ2SEQ = ["bart", "t5"]


def tiny(name: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A tiny random model of architecture ``name``, in eval mode, float32."""
    torch.manual_seed(seed)
    return BUILDERS[name](attn).eval()


CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 :|\n.,'-[]"


def char_tokenizer():
    """A character-level tokenizer (no downloads): <pad>=0, <s>=1, </s>=2, <unk>=3, then CHARS."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: i + 4 for i, c in enumerate(CHARS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_tiny_model_dir(path, seed: int = 0, initializer_range: float = 0.02):
    """A tiny Llama + char tokenizer saved as a local model folder; returns its path as str.

    A large ``initializer_range`` (e.g. 0.5) makes greedy outputs depend visibly on the prompt."""
    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=initializer_range)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------- every model type, tiny
# One set of small sizes for every config of the installed transformers, under each family's own field names.
# A field is set only where the config has it; everything else keeps the family's default.
TINY_SIZES: dict[str, int | None] = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "n_embed", "word_embed_proj_dim",
                     "pooler_hidden_size"), 32),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
                     "num_decoder_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads", "decoder_attention_heads",
                     "encoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "decoder_ffn_dim", "encoder_ffn_dim",
                     "ffn_hidden_size"), 64),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 32),
    **dict.fromkeys(("head_dim", "d_kv", "kv_channels", "attention_head_dim"), 8),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_selected_experts"), 2),
    **dict.fromkeys(("num_shared_experts", "n_shared_experts"), 1),
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 12, "rotary_dim": 4, "rotary_emb_base": 10000, "n_group": 1, "topk_group": 1,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"), 128),
    "vocab_size": VOCAB,
    "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8,  # Gemma 3n per-layer inputs
    "initializer_range": 0.2,  # larger than the default 0.02, so that t0 visibly changes the tokens
}
TINY_WINDOW = 64  # sliding windows shrink to this: longer than every test input (inputs inside the window)


def _shrink(cfg) -> None:
    per_layer = [k for k in ("intermediate_size", "activation_sparsity_pattern")
                 if isinstance(getattr(cfg, k, None), (list, tuple))]
    for key, value in TINY_SIZES.items():
        if key in cfg.__dict__ or hasattr(type(cfg), key):
            with contextlib.suppress(Exception):  # a derived (read-only) property of that family
                setattr(cfg, key, value)
    if getattr(cfg, "qk_rope_head_dim", None):  # MLA: RoPE runs on qk_rope_head_dim dims (its "head_dim")
        cfg.head_dim = cfg.qk_rope_head_dim
        if hasattr(cfg, "num_key_value_heads"):  # and every head has its own K/V (no GQA grouping)
            cfg.num_key_value_heads = cfg.num_attention_heads
    if getattr(cfg, "sliding_window", None):
        cfg.sliding_window = TINY_WINDOW
    small_ids = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 0}
    for key, small in small_ids.items():
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(cfg, key, small)
    layers = 2
    if getattr(cfg, "num_kv_shared_layers", 0):  # Gemma 3n: 2 layers of their own K/V, 2 that reuse them
        layers = cfg.num_hidden_layers = 4
        cfg.num_kv_shared_layers = 2
    types = getattr(cfg, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) > layers:
        kinds = list(dict.fromkeys(types))[:2]  # keep both kinds (e.g. sliding and full)
        cfg.layer_types = (kinds * layers)[:layers]
    for key in per_layer:  # per-layer lists (Gemma 3n)
        setattr(cfg, key, [{"intermediate_size": 64, "activation_sparsity_pattern": 0.0}[key]] * layers)


def tiny_config(model_type: str, attn: str | None = None):
    """The family's default config of ``model_type`` with every size field made tiny (2 layers, width 32)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type)
    _shrink(cfg)
    for key in ("text_config", "decoder", "encoder"):
        sub = getattr(cfg, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub)
    if attn is not None:  # None: transformers' own choice (sdpa where the family supports it, else eager)
        cfg._attn_implementation_internal = attn
    return cfg


def tiny_causal_lm(model_type: str, attn: str | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny random ``AutoModelForCausalLM`` of ``model_type``, in eval mode, float32."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    torch.manual_seed(seed)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    cfg = tiny_config(model_type, attn)
    cfg.is_decoder = True  # encoder families' *ForCausalLM are causal only as decoders (their docs say so)
    if hasattr(cfg, "causal"):
        cfg.causal = True  # XLM's LM head model is a masked LM unless its config says causal
    model = cls(cfg).eval()
    return model


def tiny_seq2seq_lm(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random ``AutoModelForSeq2SeqLM`` of ``model_type``, in eval mode, float32, whose generate is plain
    greedy / beam search (no forced BOS / EOS, no n-gram blocking; decoding starts from id 0 where unset)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES

    torch.manual_seed(seed)
    cfg = tiny_config(model_type)
    if getattr(cfg, "decoder_start_token_id", None) is None:
        cfg.decoder_start_token_id = 0
    model = getattr(transformers, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES[model_type])(cfg).eval()
    gen = model.generation_config
    gen.forced_bos_token_id = gen.forced_eos_token_id = None
    gen.no_repeat_ngram_size = 0
    gen.decoder_start_token_id = cfg.decoder_start_token_id
    return model


def save_tiny_bert_dir(path) -> str:
    """A tiny BERT and a WordPiece tokenizer with [CLS]/[SEP] and segment ids, saved as a model folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "great", "awful", "film", "plot", "a", "the"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(path)
    return str(path)
