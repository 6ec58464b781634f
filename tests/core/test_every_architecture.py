"""The one rule, over every supported causal-LM model type of the installed transformers.

A flat prefix initialized from the frozen model's own K/V of real tokens t0 must give the base model's
logits of x after [t0; x] and its greedy continuation (``reference.real_token_equivalence``). The list
below is what ``scripts/support_matrix.py`` finds supported (docs/support.md); each entry is checked
here on a tiny model built from the family's own config (2 layers, width 32).
"""

from __future__ import annotations

import pytest
from reference import real_token_equivalence
from tiny_models import tiny_causal_lm

from prefixtune import PrefixConfig, attach
from prefixtune.core.spec import INDEXED, INEXACT, NOT_INTERFACE, RECURRENT, read_spec

SUPPORTED = [  # docs/support.md, "supported"
    "afmoe", "apertus", "arcee", "aria_text", "axk1", "bart", "beam", "bert", "bert-generation", "big_bird",
    "bigbird_pegasus", "biogpt", "bitnet", "blenderbot", "blenderbot-small", "bloom", "camembert", "codegen",
    "cohere", "cohere2", "cohere2_moe", "ctrl", "cwm", "deepseek_v2", "deepseek_v3", "dots1", "electra", "ernie",
    "ernie4_5", "exaone4", "exaone_moe", "flex_olmo", "flint", "fuyu", "gemma", "gemma2", "gemma3", "gemma3_text",
    "gemma3n_text",
    "gemma4", "gemma4_text", "gemma4_unified", "gemma4_unified_text", "git", "glm", "glm4", "glm4_moe",
    "glm4_moe_lite", "got_ocr2", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gpt_neox_japanese",
    "gpt_oss", "gptj", "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "helium",
    "hunyuan_v1_dense", "hunyuan_v1_moe", "hy_v3", "hyperclovax", "internlm3", "iquestcoder", "jais2", "jetmoe",
    "kolibri1", "laguna", "lfm2", "llama", "llama4_text", "longcat_flash", "marian", "mbart", "mellum",
    "mimo_v2_flash", "minicpm3", "minimax_m2", "minimax_m3_vl_text", "ministral", "ministral3", "mistral", "mixtral",
    "mllama", "modernbert-decoder", "moshi", "moss_transcribe_diarize", "mvp", "nanochat", "nemotron", "olmo",
    "olmo2", "olmo3", "olmoe", "opt", "pegasus", "persimmon", "phi", "phi3", "phi4_multimodal", "phimoe", "plbart",
    "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "roc_bert", "roformer", "seed_oss", "smollm3", "solar_open",
    "stablelm", "starcoder2", "trocr", "vaultgemma", "whisper", "xglm", "xlm-roberta", "xlm-roberta-xl", "youtu",
]

# Refused, each with the reason its error gives (a representative of each reason).
REFUSED = {
    "openai-gpt": NOT_INTERFACE,
    "mamba": RECURRENT,
    "qwen3_next": RECURRENT,
    "deepseek_v32": INDEXED,
    "diffllama": "called more than once per forward",
    "mpt": INEXACT,
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_prefix_from_real_tokens_equals_those_tokens(model_type):
    real_token_equivalence(tiny_causal_lm(model_type))


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_types_name_the_class_and_the_reason(model_type):
    model = tiny_causal_lm(model_type)
    with pytest.raises(ValueError) as err:
        attach(model, PrefixConfig(prefix_length=2))
    assert type(model).__name__ in str(err.value)
    assert REFUSED[model_type] in str(err.value)


def test_fused_qkv_gqa_and_cache_route_shapes_are_read_from_the_modules():
    """Phi-3 projects Q, K and V with one matrix; Bloom carries its prefix in its cache: both read by mechanism."""
    phi3 = read_spec(tiny_causal_lm("phi3"))
    assert (phi3.route, phi3.stacks[0].num_layers, phi3.stacks[0].num_kv_heads, phi3.stacks[0].head_dim) == \
        ("attention", 2, 2, 8)
    bloom = read_spec(tiny_causal_lm("bloom"))
    assert (bloom.route, bloom.stacks[0].num_layers, bloom.stacks[0].num_kv_heads) == ("cache", 2, 4)
