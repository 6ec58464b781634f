"""The one rule, over every supported causal-LM model type of the installed transformers.

A flat prefix initialized from the frozen model's own K/V of real tokens t0 must give the base model's
logits of x after [t0; x] and its greedy continuation (``reference.real_token_equivalence``). The list
below is what ``scripts/support_matrix.py`` finds supported (docs/support.md); each entry is checked
here on a tiny model built from the family's own config (2 layers, width 32).
"""

from __future__ import annotations

import pytest
import torch
from reference import real_token_equivalence
from tiny_models import tiny_causal_lm

from prefixtune import PrefixConfig, attach
from prefixtune.core.spec import CACHE_STATE, NOT_CAUSAL, RECURRENT, read_spec

SUPPORTED = [  # docs/support.md, "supported"
    "afmoe", "apertus", "arcee", "aria_text", "axk1", "axk2", "bart", "beam", "bert", "bert-generation", "big_bird",
    "bigbird_pegasus", "biogpt", "bitnet", "blenderbot", "blenderbot-small", "bloom", "camembert", "codegen", "cohere",
    "cohere2", "cohere2_moe", "ctrl", "cwm", "data2vec-text", "deepseek_v2", "deepseek_v3", "deepseek_v32",
    "diffllama", "doge", "dots1", "electra", "ernie", "ernie4_5", "exaone4", "exaone_moe", "falcon", "flex_olmo",
    "flint", "fuyu", "gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n_text", "gemma4", "gemma4_text",
    "gemma4_unified", "gemma4_unified_text", "git", "glm", "glm4", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa",
    "got_ocr2", "gpt-sw3", "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gpt_neox_japanese", "gpt_oss", "gptj",
    "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared", "helium", "hunyuan_v1_dense",
    "hunyuan_v1_moe", "hy_v3", "hy_v4", "hyperclovax", "internlm3", "iquestcoder", "jais2", "jetmoe", "kolibri1",
    "laguna", "lfm2", "llama", "llama4_text", "longcat_flash", "marian", "mbart", "megatron-bert", "mellum",
    "mimo_v2_flash", "minicpm3", "minimax_m2", "minimax_m3_vl_text", "ministral", "ministral3", "mistral", "mixtral",
    "mllama", "modernbert-decoder", "moshi", "moss_transcribe_diarize", "mpt", "mvp", "nanochat", "nemotron", "olmo",
    "olmo2", "olmo3", "olmoe", "openai-gpt", "opt", "pegasus", "persimmon", "phi", "phi3", "phi4_multimodal", "phimoe",
    "plbart", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "rembert", "roberta", "roberta-prelayernorm", "roc_bert",
    "roformer", "seed_oss", "smollm3", "solar_open", "stablelm", "starcoder2", "trocr", "vaultgemma", "whisper",
    "xglm", "xlm", "xlm-roberta", "xlm-roberta-xl", "youtu",
]

# Refused, each with the reason its error gives (a representative of each reason).
REFUSED = {
    "prophetnet": NOT_CAUSAL,
    "mamba": RECURRENT,
    "qwen3_next": RECURRENT,
    "cpmant": NOT_CAUSAL,
    "xlnet": NOT_CAUSAL,
    "zaya": CACHE_STATE,
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


def test_a_causal_lm_whose_forward_sees_later_tokens_is_refused_by_what_it_does_not_by_its_name():
    """CPM-Ant's forward attends both ways (the reason of its refusal, measured here: if transformers makes it
    causal, this fails and the refusal is to be revisited); the check reads the model, not its model_type."""
    model = tiny_causal_lm("cpmant").eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    changed = ids.clone()
    changed[0, -1] = 9
    with torch.no_grad():
        first = [model(input_ids=x).logits[0, 0] for x in (ids, changed)]
    assert not torch.allclose(first[0], first[1], atol=1e-3)  # position 0 sees position 3
    model.config.model_type = "renamed"
    with pytest.raises(ValueError, match="not a causal language model"):
        attach(model, PrefixConfig(prefix_length=2))


def test_prophetnet_logits_read_later_tokens_so_it_is_refused_and_a_causal_lm_keeps_its_first_bits():
    """ProphetNet's logits come from its predict streams, whose relative position bias transformers gathers
    through a reshape that mixes positions: position 0's logits move when tokens 1-4 of 9 change (its bias weights
    scaled up here to show it plainly; at a tiny model's initialization it is 1e-7 to 6e-7, which is why the probe
    compares bits). The probe's premise holds on a causal LM: its first logits keep every bit."""
    prophetnet = tiny_causal_lm("prophetnet")
    with torch.no_grad():
        for layer in prophetnet.prophetnet.decoder.layers:
            layer.self_attn.relative_pos_embeddings.weight.mul_(50)
    ids = torch.arange(5, 14)[None]
    near, far = ids.clone(), ids.clone()
    near[0, 1:5] = 40
    far[0, 5:] = 40

    def first(model, x):
        with torch.no_grad():
            return model(input_ids=x).logits[0, 0]

    assert float((first(prophetnet, ids) - first(prophetnet, near)).abs().max()) > 1e-6
    assert torch.equal(first(prophetnet, ids), first(prophetnet, far))  # what it mixes is within its row block
    with pytest.raises(ValueError, match="not a causal language model") as err:
        attach(prophetnet, PrefixConfig(prefix_length=2))
    assert "ProphetNetForCausalLM" in str(err.value)
    for model_type in ("llama", "bloom"):  # the interface route, and the cache route (which the probe guards)
        causal = tiny_causal_lm(model_type)
        assert torch.equal(first(causal, ids), first(causal, near))


def test_fused_qkv_gqa_and_cache_route_shapes_are_read_from_the_modules():
    """Phi-3 projects Q, K and V with one matrix; Bloom carries its prefix in its cache: both read by mechanism."""
    phi3 = read_spec(tiny_causal_lm("phi3"))
    assert (phi3.route, phi3.stacks[0].num_layers, phi3.stacks[0].num_kv_heads, phi3.stacks[0].head_dim) == \
        ("attention", 2, 2, 8)
    bloom = read_spec(tiny_causal_lm("bloom"))
    assert (bloom.route, bloom.stacks[0].num_layers, bloom.stacks[0].num_kv_heads) == ("cache", 2, 4)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("variant", [
    {"alibi": True},  # ALiBi instead of RoPE
    {"new_decoder_architecture": True},  # grouped K/V, two layer norms
    {"alibi": True, "multi_query": False, "parallel_attn": False, "num_kv_heads": 4},  # sequential, one K/V per head
])
def test_falcon_variants_equal_real_tokens(variant):
    """Falcon reads its own attention implementation's name ('sdpa', else an eager path that adds the mask):
    the cache route leaves it as it was, for every variant of position scheme and layout."""
    from tiny_models import tiny_config
    from transformers import FalconForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("falcon")
    for key, value in variant.items():
        setattr(cfg, key, value)
    real_token_equivalence(FalconForCausalLM(cfg).eval())


def _left_padded_generate_equals_row_alone(model_type: str, ids_a, ids_b) -> None:
    from reference import INIT_WORDS, IdTokenizer

    model = tiny_causal_lm(model_type)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    pm = attach(model, PrefixConfig(init=f"text:{INIT_WORDS}", reparam=False), IdTokenizer())
    kw = {"max_new_tokens": 3, "do_sample": False, "pad_token_id": pad, "eos_token_id": None}
    short, long_ = torch.tensor([ids_a]), torch.tensor([ids_b])
    width = long_.shape[1]
    padded = torch.cat([torch.full((1, width - short.shape[1]), pad), short], dim=1)
    batch = torch.cat([padded, long_])
    mask = torch.cat([torch.cat([torch.zeros(1, width - short.shape[1]), torch.ones_like(short)], 1),
                      torch.ones_like(long_)]).long()
    try:
        with torch.no_grad():
            logits = pm(input_ids=batch, attention_mask=mask).logits[0, width - short.shape[1]:]
            diff = float((logits - pm(input_ids=short).logits[0]).abs().max())
        together = pm.generate(input_ids=batch, attention_mask=mask, **kw)[:, width:]
        alone = torch.stack([pm.generate(input_ids=t, attention_mask=torch.ones_like(t), **kw)[0, t.shape[1]:]
                             for t in (short, long_)])
    finally:
        pm.detach()
    assert diff < 1e-4, f"the padded row's logits differ from the row alone's by {diff}"
    assert torch.equal(together, alone), f"{together.tolist()} != rows alone {alone.tolist()}"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model_type", ["roberta", "falcon", "bloom", "gptj"])
def test_cache_route_left_padded_rows_equal_rows_alone(model_type):
    """RoBERTa numbers positions from padding_idx + 1 (PrefixModel.generate passes that numbering, pad-aware);
    Falcon and GPT-J get position_ids from the mask in forward too (as generate's are); Bloom's ALiBi follows
    the mask: the prefix stays P past positions in a left-padded batch."""
    _left_padded_generate_equals_row_alone(model_type, [9, 10, 11], [12, 13, 14, 15, 16])


@pytest.mark.parametrize("model_type", ["mpt", "roformer"])
def test_cache_route_refuses_left_padding_where_positions_count_by_index(model_type):
    """MPT's ALiBi and RoFormer's rotary number keys by index: a left pad would sit between the prefix and the
    row's tokens. The base model alone is unchanged by left padding, so this is the prefix's doing: refused."""

    model = tiny_causal_lm(model_type)
    ids, mask = torch.tensor([[0, 9, 10, 11]]), torch.tensor([[0, 1, 1, 1]])
    with torch.no_grad():
        base_diff = float((model(input_ids=ids, attention_mask=mask).logits[0, 1:]
                           - model(input_ids=ids[:, 1:]).logits[0]).abs().max())
    assert base_diff < 1e-4
    pm = attach(model, PrefixConfig(prefix_length=2))
    try:
        with pytest.raises(ValueError, match="numbers key positions by index"):
            pm(input_ids=ids, attention_mask=mask)
        pm(input_ids=torch.tensor([[9, 10, 11, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]]))  # right padding
    finally:
        pm.detach()


def test_cache_route_call_without_cache_returns_none_and_double_attach_is_refused():
    """MPT keeps no cache (use_cache=False): the cache that carried the prefix is not handed back, else generate
    would feed the whole sequence again on top of it. The cache route renames no attention implementation,
    so attaching twice is told by the model's own mark."""

    model = tiny_causal_lm("mpt")
    pm = attach(model, PrefixConfig(prefix_length=2))
    out = pm(input_ids=torch.tensor([[5, 6, 7]]))
    assert out.past_key_values is None
    assert pm(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True).past_key_values.get_seq_length() == 2 + 3
    with pytest.raises(ValueError, match="already has prefixtune attached"):
        attach(model, PrefixConfig(prefix_length=2))
    pm.detach()
    attach(model, PrefixConfig(prefix_length=2)).detach()


def test_doge_refuses_a_prefix_past_its_dynamic_mask_window():
    """Doge keeps the top keep_window_size keys of each query, chosen over its own keys: past the window a
    prefix would not be selected like real past tokens, so the call is refused with the reason."""

    model = tiny_causal_lm("doge")
    model.config.keep_window_size = 6
    for layer in model.model.layers:
        layer.self_attn.keep_window_size = 6
    pm = attach(model, PrefixConfig(prefix_length=2))
    pm(input_ids=torch.tensor([[5, 6, 7, 8]]))  # 2 + 4 keys: inside the window
    with pytest.raises(ValueError, match="keep_window_size=6"):
        pm(input_ids=torch.tensor([[5, 6, 7, 8, 9]]))
    pm.detach()


@pytest.mark.usefixtures("one_thread")
def test_openai_gpt_through_its_shim_pads_trains_and_detaches():
    """OpenAI GPT computes attention in its own ``_attn``: a shim routes it through the interface while attached.
    A left-padded row equals the row alone, the prefix gets gradients, and detach gives the module its own
    method back (the real-token rule is in the parametrized test above)."""
    from tiny_models import VOCAB

    model = tiny_causal_lm("openai-gpt")
    attn = model.transformer.h[0].attn
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    assert "_attn" in attn.__dict__ and pm.spec.route == "attention"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pm.prefix.stacks["decoder"].table.normal_(0, 1, generator=g)
    ids = torch.randint(4, VOCAB, (2, 6), generator=g)
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        both = pm(input_ids=ids, attention_mask=mask).logits
        alone = pm(input_ids=ids[1:, 2:]).logits
    torch.testing.assert_close(both[1, 2:], alone[0], atol=1e-5, rtol=1e-5)
    pm.train()
    pm(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert float(pm.prefix.stacks["decoder"].table.grad.abs().sum()) > 0
    pm.detach()
    assert "_attn" not in attn.__dict__


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa", "axk2", "hy_v4"])
def test_indexed_sparse_attention_past_index_topk_forward_and_generate_agree(model_type):
    """Indexed sparse attention: the indexer picks index_topk of the real keys for each query; the prefix has no
    indexer keys and stays visible to every query. Inside index_topk (every key picked) that is P real past
    tokens (the test above); past it, with index_topk = 3 under 6 to 9 tokens, generate's cached steps give the
    scores of a full forward over the same tokens."""
    import transformers
    from tiny_models import tiny_config
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = tiny_config(model_type)
    cfg.index_topk = 3
    torch.manual_seed(0)
    model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(cfg).eval()
    pm = attach(model, PrefixConfig(prefix_length=2, reparam=False))
    with torch.no_grad():
        for sp in pm.prefix.stacks.values():
            sp.table.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    x = torch.randint(4, 80, (1, 6), generator=torch.Generator().manual_seed(1))
    out = pm.generate(input_ids=x, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0,
                      output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = pm(input_ids=out.sequences[:, :-1]).logits[:, x.shape[1] - 1:]
        with pm.disabled():
            base = model(input_ids=out.sequences[:, :-1]).logits[:, x.shape[1] - 1:]
    torch.testing.assert_close(torch.stack(out.scores, 1), full, atol=1e-4, rtol=1e-4)
    assert float((full - base).abs().max()) > 1e-2  # past index_topk the prefix still acts
