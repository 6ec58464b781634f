"""Tiny random models built from configs (no downloads), one per supported architecture, and a tokenizer.

Imported by tests as ``from tiny_models import ...`` (``tests/`` is on pytest's pythonpath)."""

from __future__ import annotations

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
