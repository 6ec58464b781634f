"""Issue #15 at the engine: one request's numbers or failure never reach another's; sliding-window models
are served only where they are exact; prefixes are stored once and the coldest leave the device."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny

from prefixtune import PrefixConfig, attach
from prefixtune.serving import engine as engine_module
from prefixtune.serving.engine import Engine, EngineConfig
from prefixtune.serving.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    model = tiny(name, seed=seed)
    for key, value in overrides.items():
        setattr(model.config, key, value)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.3, generator=g)
    return model.requires_grad_(False)


def _batch_dependent_numerics(model: torch.nn.Module) -> None:
    """Make every row's logits depend on the batch size, as real kernels do in their last bits (here
    visibly): B = 1 is untouched."""
    direction = torch.randn(VOCAB, generator=torch.Generator().manual_seed(9))

    def hook(module, args, kwargs, output):
        output.logits.add_(0.3 * (output.logits.shape[0] - 1) * direction)
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def test_seeded_sampling_does_not_depend_on_the_batch_even_when_batched_numerics_do():
    model = _model(seed=3)
    _batch_dependent_numerics(model)
    engine = Engine(model, EngineConfig(max_batch_size=8, max_prefill_batch=8))
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15, 16]]
    seeded = [SamplingParams(max_new_tokens=12, temperature=1.5, seed=s) for s in (1, 2)]
    alone = [engine.generate([prompts[i]], seeded[i])[0] for i in range(2)]
    others = [SamplingParams(max_new_tokens=n, temperature=t) for n, t in ((6, 0.0), (15, 1.0))]
    busy = engine.generate(prompts, [*seeded, *others])
    assert busy[:2] == alone
    gens = [engine.submit(prompts[2], others[1])]  # and joining a batch that is already running
    engine.step()
    gens += [engine.submit(prompts[i], seeded[i]) for i in range(2)]
    while engine.step():
        pass
    assert [g.tokens for g in gens[1:]] == alone


def test_a_row_whose_sampling_fails_finishes_alone(monkeypatch):
    engine = Engine(_model(), EngineConfig(max_batch_size=4))
    real = engine_module.sample_row

    def flaky(logits, params, generator):
        if params.temperature == 0.7:
            raise RuntimeError("invalid multinomial distribution")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_row", flaky)
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    expected = engine.generate([[5, 6, 7]], greedy)[0]
    good = engine.submit([5, 6, 7], greedy)
    bad = engine.submit([8, 9], SamplingParams(max_new_tokens=6, temperature=0.7))
    sampled = engine.submit([8, 9], SamplingParams(max_new_tokens=6, temperature=1.0, ignore_eos=True))
    while engine.step():
        pass
    assert bad.finish_reason == "error" and "invalid multinomial" in bad.error
    assert good.finish_reason == "length" and good.tokens == expected
    assert sampled.finish_reason == "length" and len(sampled.tokens) == 6
    assert engine.stats().counters["requests_error"] == 1


def test_a_failing_forward_fails_its_batch_only():
    model = _model()
    engine = Engine(model, EngineConfig(max_batch_size=4))
    greedy = SamplingParams(max_new_tokens=5, ignore_eos=True)
    expected = engine.generate([[5, 6, 7]], greedy)[0]
    solo = engine.submit([5, 6, 7], SamplingParams(max_new_tokens=5, temperature=1.0, seed=1, ignore_eos=True))
    shared = engine.submit([5, 6, 7], greedy)
    engine.step()  # both prefilled: the seeded one in its own batch
    calls = {"n": 0}

    def fail_once(module, args, kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second forward of this step: the seeded row's batch
            raise RuntimeError("device fault")

    handle = model.register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        while engine.step():
            pass
    finally:
        handle.remove()
    assert solo.finish_reason == "error" and "device fault" in solo.error
    assert shared.finish_reason == "length" and shared.tokens == expected


@pytest.mark.parametrize("prefill", ["packed", "grouped"])
def test_sliding_window_model_is_exact_inside_the_window_and_refuses_beyond(prefill):
    """Packed, the joiners are prefilled together (their rows have no padding inside their columns);
    grouped, one at a time."""
    model = _model("mistral", seed=1, sliding_window=12)
    g = torch.Generator().manual_seed(0)
    engine = Engine(model, EngineConfig(max_prefill_batch=8, prefill=prefill))
    assert (engine.packing_refused is None) == (prefill == "packed")
    assert engine.scheduler.max_prefill_batch == (8 if prefill == "packed" else 1)
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    with torch.no_grad():
        pm.prefix.stacks["decoder"].table.copy_(torch.randn(pm.prefix.stacks["decoder"].table.shape, generator=g))
    engine.add_prefix("p", pm)
    work = [([5, 6, 7, 8, 9], "p", 4), ([10, 11], None, 9), ([12, 13, 14], "p", 6), ([15], "p", 8)]  # totals <= 12
    expected = []
    for prompt, name, new in work:
        ref = (pm if name == "p" else model).generate(input_ids=torch.tensor([prompt]), max_new_tokens=new,
                                                      do_sample=False)
        expected.append(ref[0, len(prompt):].tolist())
    pm.detach()
    got = engine.generate([w[0] for w in work], [SamplingParams(max_new_tokens=w[2]) for w in work],
                          [w[1] for w in work])
    assert got == expected
    with pytest.raises(ValueError, match=r"= 13 exceeds the sliding window of 12 positions"):
        engine.submit([5, 6], SamplingParams(max_new_tokens=8), prefix="p")


def test_prefixes_are_stored_once_and_the_coldest_leave_memory(tmp_path):
    model = _model()
    engine = Engine(model, EngineConfig(max_resident_prefixes=2))
    g = torch.Generator().manual_seed(0)
    pm = attach(model, PrefixConfig(prefix_length=4, reparam=False))
    references = {}
    for i in range(4):
        with torch.no_grad():
            pm.prefix.stacks["decoder"].table.copy_(torch.randn(pm.prefix.stacks["decoder"].table.shape,
                                                                generator=g))
        pm.save_pretrained(tmp_path / f"p{i}")
        references[f"p{i}"] = pm.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=6,
                                          do_sample=False)[0, 3:].tolist()
        engine.add_prefix(f"p{i}", tmp_path / f"p{i}")
    pm.detach()
    memory = engine.prefixes.memory()
    per_prefix = 4 * 3 * 2 * 2 * 8 * 4  # P x layers x (K, V) x kv_heads x head_dim x float32 bytes
    assert (memory["resident"], memory["on_disk"], memory["resident_bytes"]) == (2, 2, 2 * per_prefix)
    # one tensor however many requests use it
    assert engine.prefixes.get("p3").data_ptr() == engine.prefixes.get("p3").data_ptr()
    names = ["p0", "p1", "p2", "p3", "p0", "p3"]
    got = engine.generate([[5, 6, 7]] * len(names), SamplingParams(max_new_tokens=6), names)
    assert got == [references[n] for n in names]  # cold ones were read back from their folders
    assert engine.prefixes.memory()["resident"] == 2


def test_the_base_fingerprint_is_taken_once_however_many_folders_are_registered(tmp_path, monkeypatch):
    model = _model()
    pm = attach(model, PrefixConfig(prefix_length=2, reparam=False))
    for i in range(3):
        pm.save_pretrained(tmp_path / f"p{i}")
    pm.detach()
    from prefixtune.core import checkpoint
    from prefixtune.serving import registry

    calls = []
    real = checkpoint.fingerprint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "fingerprint", counting)
    monkeypatch.setattr(registry, "fingerprint", counting)
    engine = Engine(model, EngineConfig(max_resident_prefixes=1))
    for i in range(3):
        engine.add_prefix(f"p{i}", tmp_path / f"p{i}")
    for name in ("p0", "p1", "p2", "p0"):  # cold ones are read back from their folders
        engine.prefixes.get(name)
    assert len(calls) == 1
