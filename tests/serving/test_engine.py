"""The multi-prefix engine: every request in a mixed, continuously batched run gives exactly what it
gives alone through ``PrefixModel.generate`` (greedy), and the same sampled tokens for the same seed."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny_models import VOCAB, tiny, tiny_causal_lm

from prefixtune import PrefixConfig, attach, load
from prefixtune.serving.engine import Engine, EngineConfig, QueueFullError, UnknownPrefixError
from prefixtune.serving.sampling import SamplingParams, make_generator, sample_row

PREFIX_LENGTHS = {"short": 2, "long": 6, "mid": 3}


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, seed: int) -> torch.nn.Module:
    """A tiny random model with large weights, so that greedy outputs vary from token to token."""
    model = tiny(name, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3, generator=g)
    return model


def _randomize(pm, g: torch.Generator) -> None:
    with torch.no_grad():
        for sp in pm.prefix.stacks.values():
            sp.table.copy_(torch.randn(sp.table.shape, generator=g))


def _workload(seed: int) -> list[tuple[list[int], str | None, int]]:
    """(prompt, prefix name, max_new_tokens): several prefixes, no prefix, different prompt lengths."""
    g = torch.Generator().manual_seed(100 + seed)
    names = ["short", None, "long", "mid", "short", None, "long", "mid", "long"]
    lengths = [3, 7, 5, 1, 6, 4, 8, 2, 5]
    news = [6, 9, 4, 7, 5, 8, 3, 10, 1]
    return [(torch.randint(3, VOCAB, (n,), generator=g).tolist(), name, new)
            for n, name, new in zip(lengths, names, news, strict=True)]


def _prefixes_and_references(name: str, seed: int):
    """The model, three prefixes as K/V, the workload, and each request's output alone through
    PrefixModel.generate (greedy; the base model's generate for requests without a prefix)."""
    model = _model(name, seed)
    collector = Engine(model)
    work = _workload(seed)
    expected: list[list[int]] = [[] for _ in work]
    g = torch.Generator().manual_seed(seed)
    for prefix, length in [*PREFIX_LENGTHS.items(), (None, 0)]:
        pm = attach(model, PrefixConfig(prefix_length=length, reparam=False))
        if prefix is not None:
            _randomize(pm, g)
            assert collector.add_prefix(prefix, pm) == length
        for i, (prompt, wanted, new) in enumerate(work):
            if wanted == prefix:
                out = pm.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new, do_sample=False)
                expected[i] = out[0, len(prompt):].tolist()
        pm.detach()
    model.requires_grad_(False)
    return model, {n: collector.prefixes.get(n) for n in collector.prefix_names()}, work, expected


def _engine(model, prefixes, config: EngineConfig | None = None) -> Engine:
    engine = Engine(model, config)
    for name, kv in prefixes.items():
        engine.add_prefix(name, kv)
    return engine


@pytest.mark.parametrize(("name", "seed"), [("llama", 0), ("llama", 1), ("llama", 2), ("qwen3", 0), ("gpt2", 0)])
def test_mixed_batch_equals_each_request_alone(name, seed, monkeypatch):
    """Prefill of everything (packed in one row, in length groups, or one left-padded group), then continuous
    batching (3 rows, joining 2 at a time), over both cache layouts; packed rows through both attentions
    (one block-diagonal mask for short rows, the per-request loop for long ones)."""
    import prefixtune.core.cache as cache_module

    model, prefixes, work, expected = _prefixes_and_references(name, seed)
    loop = [EngineConfig(max_batch_size=16, max_prefill_batch=16), EngineConfig(max_batch_size=3, max_prefill_batch=2)]
    for i, config in enumerate((*loop,  # run first with the per-request loop, then with the dense mask
                   EngineConfig(max_batch_size=16, max_prefill_batch=16),  # packed: all 9 in one row
                   EngineConfig(max_batch_size=3, max_prefill_batch=2),  # packed, continuous joins
                   EngineConfig(max_batch_size=16, max_prefill_batch=16, kv_cache="dynamic"),
                   EngineConfig(max_batch_size=3, max_prefill_batch=2, kv_cache="dynamic"),
                   EngineConfig(max_batch_size=16, max_prefill_batch=16, prefill="grouped"),
                   EngineConfig(max_batch_size=16, max_prefill_batch=16, prefill="grouped",
                                max_prefill_padding=1e9),  # one padded group
                   EngineConfig(max_batch_size=3, max_prefill_batch=2, prefill="grouped"),
                   EngineConfig(max_batch_size=3, max_prefill_batch=2, prefill="grouped", kv_cache="dynamic"),
                   EngineConfig(max_batch_size=3, max_prefill_batch=2, prefill_chunk=3),  # chunked prompts
                   EngineConfig(max_batch_size=16, max_prefill_batch=16, prefill_chunk=2, kv_cache="dynamic"),
                   EngineConfig(max_batch_size=16, max_prefill_batch=16, prefill_chunk=4, prefill="grouped"),
                   EngineConfig(max_batch_size=16, max_prefill_batch=16, kv_cache="static"),
                   EngineConfig(max_batch_size=3, max_prefill_batch=2, kv_cache="static", prefill_chunk=3),
                   EngineConfig(max_batch_size=3, max_prefill_batch=2, kv_cache="static", prefill="grouped"))):
        monkeypatch.setattr(cache_module, "DENSE_PACKED_TOKENS", 0 if i < len(loop) else 256)
        engine = _engine(model, prefixes, config)
        assert (engine.packing_refused is None) == (config.prefill == "packed"), engine.packing_refused
        assert engine.static_refused is None and engine.layout == config.kv_cache
        got = engine.generate([w[0] for w in work], [SamplingParams(max_new_tokens=w[2]) for w in work],
                              [w[1] for w in work])
        assert got == expected, config
        assert engine.stats().running == 0 and (engine._shared.cache is None) == (config.kv_cache != "static")


@pytest.mark.parametrize("prefill", ["packed", "grouped"])
@pytest.mark.parametrize("layout", ["preallocated", "dynamic", "static"])
def test_requests_joining_mid_flight_and_alone_agree(layout, prefill):
    """New requests before every step (two at a time after the first: packed joins of mixed prefixes)."""
    model, prefixes, work, expected = _prefixes_and_references("llama", 3)
    engine = _engine(model, prefixes, EngineConfig(max_batch_size=5, max_prefill_batch=2, kv_cache=layout,
                                                   prefill=prefill))
    gens = []
    for i, (prompt, prefix, new) in enumerate(work):  # the batch changes each step
        gens.append(engine.submit(prompt, SamplingParams(max_new_tokens=new), prefix))
        if i % 2 == 0:
            engine.step()
    while engine.step():
        pass
    assert [g.tokens for g in gens] == expected
    assert all(g.finish_reason in ("length", "stop") for g in gens)
    for (prompt, prefix, new), want in zip(work, expected, strict=True):  # and each alone in the engine
        assert engine.generate([prompt], SamplingParams(max_new_tokens=new), [prefix]) == [want]


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_decode(monkeypatch):
    """prefill_chunk=4: a 19-token prompt takes 5 steps of at most 4 tokens each; the running row gets a
    token at every one of them; both give their tokens alone; a chunked request cancelled midway leaves."""
    model, prefixes, _, _ = _prefixes_and_references("llama", 4)
    g = torch.Generator().manual_seed(7)
    short, long = (torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (3, 19))
    unchunked = _engine(model, prefixes, EngineConfig(prefill_chunk=None))
    want_short, want_long = unchunked.generate([short, long], [SamplingParams(max_new_tokens=12, ignore_eos=True),
                                                               SamplingParams(max_new_tokens=4, ignore_eos=True)],
                                               ["mid", "long"])
    engine = _engine(model, prefixes, EngineConfig(prefill_chunk=4))
    widths: list[int] = []
    forward = engine.runner.forward
    monkeypatch.setattr(engine.runner, "forward",
                        lambda ids, *a, **k: widths.append(ids.shape[1]) or forward(ids, *a, **k))
    a = engine.submit(short, SamplingParams(max_new_tokens=12, ignore_eos=True), "mid")
    engine.step()
    b = engine.submit(long, SamplingParams(max_new_tokens=4, ignore_eos=True), "long")
    for step in range(5):  # chunks of 4, 4, 4, 4, 3
        assert not b.tokens and len(a.tokens) == 2 + step
        engine.step()
    assert len(b.tokens) == 2 and len(a.tokens) == 7  # b's first token after its last chunk, then a decode
    while engine.step():
        pass
    assert (a.tokens, b.tokens) == (want_short, want_long)
    assert max(widths) == 4 and engine.stats().counters["prompt_tokens"] == len(short) + len(long)
    c = engine.submit(long, SamplingParams(max_new_tokens=4), "short")
    engine.step()
    c.cancel()
    assert not engine.step() and c.finish_reason == "cancelled" and not engine._chunked
    with pytest.raises(ValueError, match="prefill_chunk must be None or an integer >= 1"):
        EngineConfig(prefill_chunk=0)


@pytest.mark.parametrize("model_type", ["roberta", "roformer", "mpt", "bart", "bloom", "diffllama", "mimo_v2_flash",
                                        "git"])
def test_cache_route_models_serve_the_tokens_of_prefix_model_generate(model_type):
    """Models carrying the prefix in their own cache: RoBERTa numbers positions from padding_idx + 1 (the
    engine adds the offset); RoFormer, MPT and BART's decoder count positions by cache column and take no
    position ids, so each request runs in a batch of its own (``rows_alone``); Bloom's ALiBi follows the mask,
    so its rows share a batch, and so do DiffLlama's (two attention calls over one cached K/V; RoPE from
    position ids). MiMo-V2-Flash (attention route) has layers of different K/V heads: its prefixes are flat
    (P, width) and cut per layer. GIT's attention does not honour the mask over cached left padding: the check
    at construction (``batching_refused``) finds it, so its requests run alone; before, rows of a shared batch
    got other tokens. Mixed prompt lengths, every prefill mode and cache layout."""
    model = tiny_causal_lm(model_type)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3, generator=g)
    model.generation_config.eos_token_id = model.generation_config.forced_eos_token_id = None  # BART forces EOS
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    _randomize(pm, g)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 2, 7)]
    want = [pm.generate(input_ids=torch.tensor([p]), max_new_tokens=6, do_sample=False)[0, len(p):].tolist()
            for p in prompts]
    collector = Engine(model)
    collector.add_prefix("x", pm)
    kv = collector.prefixes.get("x")
    pm.detach()
    model.requires_grad_(False)
    for config in (EngineConfig(), EngineConfig(prefill="grouped", max_prefill_padding=1e9),
                   EngineConfig(kv_cache="static"), EngineConfig(kv_cache="dynamic")):
        engine = _engine(model, {"x": kv}, config)
        assert engine.rows_alone == (model_type in ("roformer", "mpt", "bart", "git"))
        assert (engine.batching_refused is not None) == engine.rows_alone
        assert engine.generate(prompts, SamplingParams(max_new_tokens=6), ["x"] * 3) == want, config


@pytest.mark.parametrize(("model_type", "reason"), [
    ("deepseek_v3", "holds other shapes than its attention reads (layer 0"),  # MLA: a compressed latent
    ("deepseek_v32", "holds other shapes than its attention reads (layer 0"),
    ("jetmoe", "holds other shapes than its attention reads (layer 0"),  # caches 2 heads, its attention reads 4
    ("gemma3n_text", "keeps no standard per-layer cache"),  # layers that reuse another layer's K/V
])
def test_a_model_whose_cache_is_not_what_its_attention_reads_is_refused_by_the_engine(model_type, reason):
    """The engine writes each request's prefix into the model's own cache. Where that cache holds other than
    the K/V the attention reads, it is refused at construction. Before, MLA models failed at add_prefix on a
    shape mismatch, and Gemma 3n and JetMoE were served with tokens other than PrefixModel.generate's."""
    with pytest.raises(ValueError, match="the engine serves from the model's KV cache") as err:
        Engine(tiny_causal_lm(model_type))
    assert reason in str(err.value)


def test_a_model_without_a_kv_cache_is_refused_by_the_engine():
    with pytest.raises(ValueError, match="OpenAIGPTLMHeadModel keeps none"):
        Engine(tiny_causal_lm("openai-gpt"))


def test_prefixes_loaded_from_saved_folders_match_load_generate(tmp_path):
    model = _model("llama", 0)
    g = torch.Generator().manual_seed(0)
    for i, (length, fold) in enumerate([(4, False), (2, True)]):  # the MLP kept, and folded
        pm = attach(model, PrefixConfig(prefix_length=length, reparam=True, reparam_hidden=16))
        with torch.no_grad():
            for p in pm.prefix.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        pm.save_pretrained(tmp_path / f"p{i}", fold=fold)
        pm.detach()
    model.requires_grad_(False)
    engine = Engine(model)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    for i in range(2):
        assert engine.add_prefix(f"p{i}", tmp_path / f"p{i}") == [4, 2][i]
    got = engine.generate(prompts * 2, SamplingParams(max_new_tokens=6), ["p0", "p0", "p1", "p1"])
    for i in range(2):
        pm = load(tmp_path / f"p{i}", model)
        for j, prompt in enumerate(prompts):
            ref = pm.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
            assert got[2 * i + j] == ref[0, len(prompt):].tolist()
        pm.detach()


def _reference_sample(forward, prompt: list[int], params: SamplingParams) -> list[int]:
    """Full recomputation (no cache) through ``forward`` and the request's own generator."""
    generator = make_generator(params, torch.device("cpu"))
    seq = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(params.max_new_tokens):
            logits = forward(input_ids=torch.tensor([seq])).logits
            token = sample_row(logits[0, -1].float(), params, generator)
            out.append(token)
            seq.append(token)
            if token == 2:
                break
    return out


def test_sampled_tokens_depend_only_on_the_seed():
    model = _model("llama", 4)
    engine = Engine(model, EngineConfig(max_batch_size=3, max_prefill_batch=2))
    g = torch.Generator().manual_seed(4)
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    _randomize(pm, g)
    engine.add_prefix("p", pm)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    params = [SamplingParams(max_new_tokens=8, temperature=t, top_p=p, seed=s)
              for t, p, s in [(0.8, 0.9, 1), (1.0, 1.0, 2), (1.3, 0.5, 3)]]
    names = ["p", None, "p"]
    alone = [engine.generate([pr], sp, [n])[0] for pr, sp, n in zip(prompts, params, names, strict=True)]
    mixed = engine.generate(prompts * 2, params * 2, [*names, "p", "p", None])
    assert mixed[:3] == alone and mixed[3] == alone[0]  # the same request twice in one batch, too
    for prompt, sp, name, want in zip(prompts, params, names, alone, strict=True):
        assert _reference_sample(pm if name == "p" else model, prompt, sp) == want
    reseeded = engine.generate(prompts, [SamplingParams(max_new_tokens=8, temperature=1.0, seed=99)] * 3, names)
    assert reseeded != alone
    greedy_any_seed = engine.generate([prompts[0]] * 2, [SamplingParams(max_new_tokens=8, seed=s) for s in (1, 2)],
                                      ["p", "p"])
    assert greedy_any_seed[0] == greedy_any_seed[1]
    pm.detach()


def test_stop_tokens_eos_and_ignore_eos():
    model = _model("llama", 0)
    engine = Engine(model, eos_token_ids=[])
    free = engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=8))[0]
    stop = free[3]
    gen = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))
    while engine.step():
        pass
    assert gen.tokens == free[: free.index(stop) + 1] and gen.finish_reason == "stop"
    eos_engine = Engine(model, eos_token_ids=[stop])
    assert eos_engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=8))[0] == gen.tokens
    assert eos_engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=8, ignore_eos=True))[0] == free


def test_queue_bound_cancel_and_stats():
    engine = Engine(_model("llama", 0), EngineConfig(max_batch_size=1, max_waiting=2))
    a = engine.submit([5, 6], SamplingParams(max_new_tokens=50, ignore_eos=True))
    b = engine.submit([7, 8], SamplingParams(max_new_tokens=3, ignore_eos=True))
    with pytest.raises(QueueFullError, match="max_waiting=2"):
        engine.submit([9], SamplingParams(max_new_tokens=3))
    engine.step()
    engine.step()
    assert engine.stats().running == 1 and engine.stats().waiting == 1
    a.cancel()
    while engine.step():
        pass
    assert a.finish_reason == "cancelled" and len(a.tokens) == 3  # prefill + 2 decodes
    assert b.finish_reason == "length" and len(b.tokens) == 3
    stats = engine.stats()
    assert stats.counters["requests_rejected"] == 1 and stats.counters["requests_cancelled"] == 1
    assert stats.counters["generated_tokens"] == 6 and (stats.waiting, stats.running) == (0, 0)


def test_background_thread_serves_concurrent_submitters():
    model = _model("llama", 1)
    engine = Engine(model, EngineConfig(max_batch_size=4))
    prompts = [[5 + i, 6, 7 + i] for i in range(6)]
    expected = engine.generate(prompts, SamplingParams(max_new_tokens=5))
    engine.start()
    try:
        results: dict[int, list[int]] = {}

        def client(i: int) -> None:
            results[i] = engine.submit(prompts[i], SamplingParams(max_new_tokens=5)).wait(timeout=30)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert [results[i] for i in range(6)] == expected
    finally:
        engine.stop()
    late = engine.submit([5], SamplingParams(max_new_tokens=2))
    engine.stop()
    assert late.finish_reason == "cancelled"


def test_errors_name_the_request_and_field():
    engine = Engine(_model("llama", 0), EngineConfig(max_context=20))
    with pytest.raises(UnknownPrefixError, match=r"request r1: unknown prefix 'nope'"):
        engine.submit([5], prefix="nope", request_id="r1")
    with pytest.raises(ValueError, match=r"request r2: prompt_ids\[1\] = 1000 is outside the vocabulary"):
        engine.submit([5, 1000], request_id="r2")
    with pytest.raises(ValueError, match=r"request r3: prompt_ids is empty"):
        engine.submit([], request_id="r3")
    with pytest.raises(ValueError, match=r"request r4: .*max_new_tokens \(16\) = 26 exceeds the context of 20"):
        engine.submit(list(range(5, 15)), SamplingParams(max_new_tokens=16), request_id="r4")
    with pytest.raises(ValueError, match=r"expected \(P, \*\(3, 2, 2, 8\)\)"):
        engine.add_prefix("bad", torch.zeros(4, 3, 2, 2, 9))
    with pytest.raises(UnknownPrefixError):
        engine.remove_prefix("bad")
    for field, kwargs in [("max_new_tokens", {"max_new_tokens": 0}), ("temperature", {"temperature": -1.0}),
                          ("top_p", {"top_p": 0.0}), ("seed", {"seed": -3}), ("stop_token_ids",
                                                                              {"stop_token_ids": [2]})]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(ValueError, match="max_batch_size"):
        EngineConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="decoder-only"):
        Engine(tiny("t5"))


def test_cache_surgery_pads_on_the_left_merges_and_keeps_rows():
    from prefixtune.core.cache import cache_from_prefixes, cache_length, keep_cache_rows, merge_caches

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 2, 2, 4, generator=g), torch.randn(4, 3, 2, 2, 4, generator=g)  # P=2 and P=4
    cache, mask = cache_from_prefixes([a, None, b], torch.device("cpu"), torch.float32)
    assert mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    layer = cache.layers[1]
    assert layer.keys.shape == (3, 2, 4, 4)
    assert torch.equal(layer.keys[0, :, 2:], a[:, 1, 0].transpose(0, 1))  # (kv_heads, P, head_dim)
    assert torch.equal(layer.values[2], b[:, 1, 1].transpose(0, 1))
    assert not layer.keys[1].any()
    other, _ = cache_from_prefixes([torch.randn(6, 3, 2, 2, 4, generator=g)], torch.device("cpu"), torch.float32)
    merged = merge_caches(cache, other)
    assert cache_length(merged) == 6 and merged.layers[0].keys.shape == (4, 2, 6, 4)
    assert torch.equal(merged.layers[1].keys[0, :, 4:], a[:, 1, 0].transpose(0, 1))  # two more zero columns
    assert not merged.layers[1].keys[0, :, :4].any()
    assert keep_cache_rows(merged, [2, 3], drop_left=2) == [2, 3]
    assert merged.layers[2].keys.shape == (2, 2, 4, 4)
    assert torch.equal(merged.layers[1].values[0], b[:, 1, 1].transpose(0, 1))
    empty, none_mask = cache_from_prefixes([None, None], torch.device("cpu"), torch.float32)
    assert cache_length(empty) == 0 and none_mask.shape == (2, 0)


def test_prefill_packs_or_groups_prompts_so_padding_stays_within_the_bound():
    model = _model("llama", 0)
    shapes: list[tuple[int, int]] = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    lengths = [2, 40, 2, 11, 3, 10, 39, 40]
    prompts = [list(range(5, 5 + n)) for n in lengths]
    padded_engine = Engine(model, EngineConfig(max_prefill_padding=1e9, prefill="grouped"))
    grouped_engine = Engine(model, EngineConfig(prefill="grouped"))
    packed_engine = Engine(model)
    try:
        shapes.clear()  # only the forwards of generation count
        padded = padded_engine.generate(prompts, SamplingParams(max_new_tokens=3))
        one_group = list(shapes)
        shapes.clear()
        grouped = grouped_engine.generate(prompts, SamplingParams(max_new_tokens=3))
        grouped_shapes = list(shapes)
        shapes.clear()
        packed = packed_engine.generate(prompts, SamplingParams(max_new_tokens=3))
    finally:
        handle.remove()
    assert grouped == padded == packed  # the grouping and the packing change the cost, not the tokens
    assert [s for s in shapes if s[1] > 1] == [(1, sum(lengths))]  # packed: one row, no padding
    shapes = grouped_shapes
    assert one_group[0] == (8, 40)
    prefill = [s for s in shapes if s[1] > 1]
    assert sorted(prefill) == [(1, 3), (2, 2), (2, 11), (3, 40)]  # 2+2 | 3 | 10+11 | 39+40+40
    assert sum(b * t for b, t in prefill) <= 1.05 * sum(lengths)


def test_preallocated_cache_writes_in_place_and_holds_what_a_dynamic_cache_holds():
    """Decode steps, a join of longer rows, leaving rows and dropped padding columns: the preallocated
    cache holds exactly the dynamic cache's real columns (rows in the order it reports), and a decode
    step, a leave and a drop of columns copy nothing but the moved rows."""
    from transformers import DynamicCache

    from prefixtune.core.cache import PreallocatedCache, keep_cache_rows, merge_caches

    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(3, 2, t, 4, generator=g) for t in (5, 1, 1, 1)]
    caches = [DynamicCache(), PreallocatedCache()]
    for cache in caches:
        for step in steps:
            cache.update(step, -step, 0)
    dynamic, pre = caches
    layer = pre.layers[0]
    assert torch.equal(layer.keys, dynamic.layers[0].keys) and torch.equal(layer.values, dynamic.layers[0].values)
    pointer = layer.keys.data_ptr()
    step = torch.randn(3, 2, 1, 4, generator=g)
    for cache in caches:
        cache.update(step, -step, 0)
    assert layer.keys.data_ptr() == pointer and layer.keys.shape == (3, 2, 9, 4)  # written in place
    joiner = torch.randn(2, 2, 12, 4, generator=g)  # longer than the batch: the window grows to the left
    other = [DynamicCache(), PreallocatedCache()]
    for cache in other:
        cache.update(joiner, -joiner, 0)
    dynamic, pre = merge_caches(dynamic, other[0]), merge_caches(pre, other[1])
    assert pre.layers[0] is layer and dynamic.layers[0].keys.shape == layer.keys.shape == (5, 2, 12, 4)
    buffer = layer._key_buffer.data_ptr()
    for rows in ([0, 2, 3, 4], [1, 2, 3]):  # a middle row leaves; then the first (the last row moves)
        drop = 1 if rows[0] == 0 else 0
        order = keep_cache_rows(pre, rows, drop_left=drop)
        assert keep_cache_rows(dynamic, rows, drop_left=drop) == rows and sorted(order) == rows
        index = [rows.index(i) for i in order]  # the dynamic rows in the preallocated order
        assert torch.equal(layer.keys, dynamic.layers[0].keys[index])
        assert torch.equal(layer.values, dynamic.layers[0].values[index])
        dynamic.layers[0].keys = dynamic.layers[0].keys[index]  # follow the reorder, as RunningBatch does
        dynamic.layers[0].values = dynamic.layers[0].values[index]
    assert layer._key_buffer.data_ptr() == buffer  # leaving rows and dropped columns: no reallocation
    assert isinstance(pre.layers[0], type(layer)) and layer.keys.shape == (3, 2, 11, 4)


def test_static_layout_decodes_in_a_few_fixed_shapes_and_keeps_its_buffers(monkeypatch):
    """kv_cache="static": every decode forward of a run with continuous joins has one of a few (slots,
    capacity) shapes (powers of two), the buffers move only when a join needs more, and leaving rows
    free their slots without a copy; the tokens are each request's alone."""
    model, prefixes, work, expected = _prefixes_and_references("llama", 5)
    engine = _engine(model, prefixes, EngineConfig(max_batch_size=4, max_prefill_batch=2, kv_cache="static"))
    shapes, pointers = [], set()
    forward = engine.runner.forward

    def record(ids, mask, positions, cache, decode=False):
        if decode:
            shapes.append((tuple(ids.shape), tuple(mask.shape)))
            pointers.add((cache.layers[0].keys.data_ptr(), cache.write.data_ptr()))
        return forward(ids, mask, positions, cache, decode)

    monkeypatch.setattr(engine.runner, "forward", record)
    got = engine.generate([w[0] for w in work], [SamplingParams(max_new_tokens=w[2]) for w in work],
                          [w[1] for w in work])
    assert got == expected
    distinct = sorted(set(shapes))
    assert len(shapes) > 10 and len(distinct) <= 3 and len(pointers) == len(distinct), distinct
    for (slots, one), (_, _, _, capacity) in distinct:
        assert one == 1 and slots & (slots - 1) == 0 and capacity & (capacity - 1) == 0 and capacity >= 64
    assert len(engine._shared) == 0 and engine._shared.cache is not None  # kept for the next requests
    long = [SamplingParams(max_new_tokens=80, ignore_eos=True), SamplingParams(max_new_tokens=5, ignore_eos=True)]
    prompts, names = [work[0][0], work[1][0]], [work[0][1], work[1][1]]
    want = _engine(model, prefixes).generate(prompts, long, names)  # the preallocated layout
    assert engine.generate(prompts, long, names) == want
    assert engine._shared.cache.shape[1] == 128  # the columns doubled as the long row grew past 64


def test_static_layout_is_refused_where_it_would_not_be_exact():
    """Bloom builds ALiBi from a 2-D mask, so it cannot take the static layout's 4-D one: refused at
    construction with the reason, and served with the preallocated cache (the same tokens)."""
    model = tiny_causal_lm("bloom").requires_grad_(False)
    static = Engine(model, EngineConfig(kv_cache="static"))
    assert static.layout == "preallocated" and static.static_refused.startswith("static decode failed")
    prompts = [[5, 6, 7, 8], [9, 10]]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    assert static.generate(prompts, params) == Engine(model).generate(prompts, params)


@pytest.mark.slow  # torch.compile's first call takes minutes of CPU
@pytest.mark.parametrize("layout", ["preallocated", "static"])
def test_compiled_decode_gives_the_tokens_of_prefix_model_generate(layout):
    """compile_decode with dynamic shapes (preallocated), and with static ones (the CUDA-graph layout)."""
    model, prefixes, work, expected = _prefixes_and_references("llama", 0)
    engine = _engine(model, prefixes, EngineConfig(max_batch_size=3, max_prefill_batch=2, compile_decode="default",
                                                   kv_cache=layout))
    from torch._dynamo.utils import counters

    def run() -> list[list[int]]:
        return engine.generate([w[0] for w in work], [SamplingParams(max_new_tokens=w[2]) for w in work],
                               [w[1] for w in work])

    graphs = counters["stats"]["unique_graphs"]
    assert run() == expected and engine.runner.decode_model is not None and engine.layout == layout
    if layout == "static":  # one graph per (slots, capacity) bucket, and none new for the same work again
        compiled = counters["stats"]["unique_graphs"]
        assert compiled - graphs <= 2 and run() == expected and counters["stats"]["unique_graphs"] == compiled


def test_packing_is_refused_where_it_would_not_be_exact_and_the_grouped_prefill_serves(monkeypatch):
    """An eager-attention model, and a model whose packed attention would let requests see each other
    (``packed_attention`` replaced by a no-op), are refused at construction with the reason; their tokens
    stay those of each request alone."""
    import contextlib

    from prefixtune.serving import runner as runner_module

    model, prefixes, work, expected = _prefixes_and_references("llama", 0)
    eager = tiny("llama", attn="eager", seed=0)
    eager.load_state_dict(model.state_dict())
    assert "'eager'" in Engine(eager).packing_refused
    monkeypatch.setattr(runner_module, "packed_attention", lambda model, segments: contextlib.nullcontext())
    engine = _engine(model, prefixes, EngineConfig(max_batch_size=16, max_prefill_batch=16))
    assert engine.packing_refused.startswith("packed logits differ from the request alone")
    got = engine.generate([w[0] for w in work], [SamplingParams(max_new_tokens=w[2]) for w in work],
                          [w[1] for w in work])
    assert got == expected
    for config in (EngineConfig(max_batch_size=16, max_prefill_batch=16), EngineConfig(prefill="grouped")):
        eager_engine = _engine(eager.requires_grad_(False), prefixes, config)
        assert eager_engine.generate([w[0] for w in work], [SamplingParams(max_new_tokens=w[2]) for w in work],
                                     [w[1] for w in work]) == expected


def test_a_sliding_window_size_the_model_does_not_use_is_ignored():
    """Qwen2-MoE's config carries sliding_window (0 here) with use_sliding_window=False and full-attention
    layers: the engine serves it as full attention (before, it refused the model: "not a window size")."""
    model = tiny_causal_lm("qwen2_moe")
    assert model.config.use_sliding_window is False and model.config.sliding_window == 0
    assert Engine(model).window is None
