"""attn_implementation="flex_attention": the prefix acts as real past tokens, as under sdpa and eager.

On CPU the prefixed calls run flex_attention unfused (``inject._flex_stance``; PyTorch 2.13's compiled CPU kernel
fails to build for them). The base model's references below run unfused too (``set_stance("force_eager")``: the
same flex math without a compile per shape), except the first test, which keeps transformers' compiled flex for
the base model, as a user's run would (the one compile of this file).
"""

from __future__ import annotations

import pytest
import torch
from reference import INIT_WORDS, IdTokenizer, real_token_equivalence
from tiny_models import VOCAB, tiny_causal_lm

from prefixtune import PrefixConfig, attach
from prefixtune.core.inject import set_attention_implementation

FLEX = "flex_attention"
# transformers' own flex mask (masking_utils.flex_attention_mask) passes create_block_mask's deprecated _compile flag
pytestmark = pytest.mark.filterwarnings("ignore:_compile flag on create_block_mask:DeprecationWarning")
GREEDY = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}


@pytest.fixture
def unfused():
    """Every flex_attention call in the test runs unfused (no compile): exact flex math on CPU."""
    with torch.compiler.set_stance("force_eager"):
        yield


@pytest.mark.usefixtures("one_thread")
def test_llama_with_transformers_compiled_base_equals_real_tokens():
    """The base model's calls run transformers' compiled flex_attention, the prefixed ones unfused."""
    real_token_equivalence(tiny_causal_lm("llama", attn=FLEX))


@pytest.mark.usefixtures("one_thread", "unfused")
@pytest.mark.parametrize("model_type", ["llama", "gemma2", "mistral", "qwen3"])
def test_prefix_from_real_tokens_equals_those_tokens(model_type):
    """Gemma 2: attention-logit soft-capping (flex's score_mod) and sliding/full layers; Mistral: sliding window
    (inputs inside it); Qwen 3: query/key norms."""
    model = tiny_causal_lm(model_type, attn=FLEX)
    assert model.config._attn_implementation == FLEX
    real_token_equivalence(model)


@torch.no_grad()
def _rows_equal_their_real_tokens(model: torch.nn.Module, device: torch.device) -> None:
    """One batch: rows with prefixes of 4 and 2 real tokens and none, one row left-padded. Each row's logits and
    greedy tokens must equal the base model's for [t0_r; x_r] (row_prefixes, the public per-row argument)."""
    tok = IdTokenizer()
    words = [INIT_WORDS, "xy", None]
    kvs = []
    for w in words:
        if w is None:
            kvs.append(None)
            continue
        pm = attach(model, PrefixConfig(init=f"text:{w}", reparam=False), tok)
        kvs.append(pm.decoder_kv())
        pm.detach()
    ids = torch.randint(4, VOCAB, (3, 5), generator=torch.Generator().manual_seed(5)).to(device)
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1], [1] * 5], device=device)
    ids = ids.masked_fill(mask == 0, 0)
    host = attach(model, PrefixConfig(prefix_length=1, reparam=False))
    try:
        logits = host(input_ids=ids, attention_mask=mask, row_prefixes=kvs).logits
        tokens = host.generate(input_ids=ids, attention_mask=mask, row_prefixes=kvs, **GREEDY)[:, 5:]
    finally:
        host.detach()
    for r, w in enumerate(words):
        keep = mask[r] == 1
        t0 = tok(w)["input_ids"] if w is not None else torch.zeros(1, 0, dtype=torch.long)
        full = torch.cat([t0.to(device), ids[r:r + 1, keep]], dim=1)
        ref = model(input_ids=full).logits[:, t0.shape[1]:]
        ref_tokens = model.generate(input_ids=full, attention_mask=torch.ones_like(full), **GREEDY)[:, full.shape[1]:]
        torch.testing.assert_close(logits[r:r + 1, keep], ref, atol=1e-5, rtol=1e-5, msg=f"row {r}")
        assert torch.equal(tokens[r:r + 1], ref_tokens), f"row {r}: {tokens[r].tolist()} != {ref_tokens.tolist()}"
        if w is not None:  # the prefix made a difference for this row
            assert float((model(input_ids=full[:, t0.shape[1]:]).logits - ref).abs().max()) > 1e-3


@pytest.mark.usefixtures("one_thread", "unfused")
@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_padded_rows_with_different_prefix_lengths_equal_their_real_tokens(model_type):
    _rows_equal_their_real_tokens(tiny_causal_lm(model_type, attn=FLEX), torch.device("cpu"))


@pytest.mark.usefixtures("one_thread", "unfused")
@torch.no_grad()
def test_beyond_the_sliding_window_flex_equals_sdpa():
    """Past Mistral's window (4 < 9 tokens) the prefix stays visible and the real keys slide, as under sdpa
    (the meaning chosen for sliding windows): forward, greedy and beam-search tokens equal sdpa's with the same
    prefix, a left-padded row included."""
    from tiny_models import tiny_config
    from transformers import MistralForCausalLM

    cfg = tiny_config("mistral", attn=FLEX)
    cfg.sliding_window = 4
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    pm = attach(model, PrefixConfig(init=f"text:{INIT_WORDS}", reparam=False), IdTokenizer())
    x = torch.randint(4, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    runs = {}
    for impl in (FLEX, "sdpa"):
        set_attention_implementation(model, impl)
        runs[impl] = (pm(input_ids=x, attention_mask=mask).logits,
                      pm.generate(input_ids=x, attention_mask=mask, **GREEDY),
                      pm.generate(input_ids=x, attention_mask=mask, num_beams=3, **GREEDY))
    pm.detach()
    keep = mask.bool()
    torch.testing.assert_close(runs[FLEX][0][keep], runs["sdpa"][0][keep], atol=1e-5, rtol=1e-5)
    assert torch.equal(runs[FLEX][1], runs["sdpa"][1])
    assert torch.equal(runs[FLEX][2], runs["sdpa"][2]), "beam search"


def test_flex_is_refused_where_untested_and_flash_attention_2_says_why():
    from tiny_models import tiny

    bart = tiny("bart")
    bart.config._attn_implementation_internal = FLEX
    with pytest.raises(ValueError, match=r"flex_attention.*decoder-only"):
        attach(bart, PrefixConfig(prefix_length=2))
    llama = tiny_causal_lm("llama")
    for cfg in {id(m.config): m.config for m in llama.modules() if hasattr(m, "config")}.values():
        cfg._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match=r"flash_attention_2.*none of the machines"):
        attach(llama, PrefixConfig(prefix_length=2))


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "gemma2", "mistral"])
def test_cuda_compiled_flex_equals_real_tokens(model_type):
    """On CUDA the prefixed calls run transformers' compiled flex_attention (no unfused stance): one prefix, and
    padded rows with different prefix lengths."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda")
    real_token_equivalence(tiny_causal_lm(model_type, attn=FLEX).to(device))
    _rows_equal_their_real_tokens(tiny_causal_lm(model_type, attn=FLEX).to(device), device)


@pytest.mark.gpu
def test_cuda_prefix_gradients_equal_sdpa_gradients():
    """Training through flex_attention (CUDA: PyTorch 2.13 has no flex backward on CPU): the prefix's loss and
    gradients equal those under sdpa."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model = tiny_causal_lm("llama", attn=FLEX).cuda()
    ids = torch.randint(4, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1)).cuda()
    mask = torch.tensor([[1] * 6, [0, 1, 1, 1, 1, 1]], device="cuda")
    results = {}
    for impl in (FLEX, "sdpa"):
        set_attention_implementation(model, impl)
        torch.manual_seed(0)
        pm = attach(model, PrefixConfig(prefix_length=3, reparam=True, reparam_hidden=16))
        pm.train()
        loss = pm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        results[impl] = (loss.detach(), {n: p.grad.clone() for n, p in pm.prefix.named_parameters()})
        pm.detach()
        set_attention_implementation(model, FLEX)
    torch.testing.assert_close(results[FLEX][0], results["sdpa"][0])
    for n, g in results["sdpa"][1].items():
        torch.testing.assert_close(results[FLEX][1][n], g, atol=1e-6, rtol=1e-5, msg=n)
