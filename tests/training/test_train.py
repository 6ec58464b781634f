"""The training loop: loss goes down, checkpoints are atomic, resume is exact (even after kill -9)."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import char_tokenizer, tiny

from prefixtune import PrefixConfig, attach
from prefixtune.tasks.encoding import EncodedExample
from prefixtune.training.loop import (
    LENGTH_GROUP_BATCHES,
    LOG_NAME,
    STATE_NAME,
    NonFiniteLossError,
    TrainConfig,
    _batches_of_epoch,
    fit,
)

TESTS = Path(__file__).resolve().parent


def _examples(n: int = 12) -> list[EncodedExample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        src = torch.randint(3, 96, (3 + i % 4,), generator=g).tolist()
        tgt = [*torch.randint(3, 96, (4,), generator=g).tolist(), 2]
        out.append(EncodedExample(input_ids=src + tgt, labels=[-100] * len(src) + tgt, where=f"x:{i}"))
    return out


def _model(seed: int = 0, dropout: float = 0.1):
    torch.manual_seed(seed)
    return attach(tiny("llama"), PrefixConfig(prefix_length=3, reparam=True, reparam_hidden=16, dropout=dropout))


CFG = TrainConfig(epochs=3, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2, eval_every=3, log_every=1,
                  seed=7, checkpoint_every=2)


def _final(pm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in pm.trainable_state_dict().items()}


def test_fit_lowers_loss_logs_and_keeps_the_best(tmp_path):
    pm = _model()
    saved = []
    state = fit(pm, _examples(), tmp_path, CFG, pad_id=0, dev=_examples(4), progress=False,
                save_best=lambda d: saved.append(d) or pm.save_pretrained(d))
    assert state.step == CFG.total_steps(12) == math.ceil(12 / 4 / 2) * 3
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == state.step and losses[-1] < losses[0]
    assert [r["step"] for r in log if "dev_loss" in r] == [3, 6]
    assert saved and (tmp_path / "best" / "prefix.safetensors").is_file()
    assert state.best_dev_loss == min(r["dev_loss"] for r in log if "dev_loss" in r)
    assert len(list(tmp_path.glob("state-*.safetensors"))) == 1


@pytest.mark.parametrize("group_by_length", [False, True])
def test_resume_after_an_exception_equals_an_uninterrupted_run(tmp_path, group_by_length):
    cfg = dataclasses.replace(CFG, group_by_length=group_by_length)
    ref = _model()
    fit(ref, _examples(), tmp_path / "a", cfg, pad_id=0, dev=_examples(4), progress=False)

    class Stop(Exception):
        pass

    def stop_at_4(state):
        if state.step == 4:
            raise Stop

    pm = _model()
    with pytest.raises(Stop):
        fit(pm, _examples(), tmp_path / "b", cfg, pad_id=0, dev=_examples(4), progress=False, on_step=stop_at_4)
    resumed = _model(seed=123)  # a fresh process would start from other random values
    state = fit(resumed, _examples(), tmp_path / "b", cfg, pad_id=0, dev=_examples(4), resume=True, progress=False)
    assert state.step == cfg.total_steps(12)
    for k, v in _final(ref).items():
        assert torch.equal(_final(resumed)[k], v), k
    log_b = [json.loads(x) for x in (tmp_path / "b" / LOG_NAME).read_text().splitlines()]
    log_a = [json.loads(x) for x in (tmp_path / "a" / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a]  # no duplicate or missing lines


KILLED = textwrap.dedent(
    """
    import os, signal, sys, torch
    sys.path[:0] = [{tests!r}, {tests_root!r}]
    from test_train import CFG, _examples, _model
    from prefixtune.training.loop import fit

    torch.set_num_threads({threads})  # as many as the test process: bitwise equality needs the same reductions

    def kill_at_5(state):
        if state.step == 5:
            os.kill(os.getpid(), signal.SIGKILL)

    fit(_model(), _examples(), {out!r}, CFG, pad_id=0, dev=_examples(4), progress=False, on_step=kill_at_5)
    """
)


def test_resume_after_kill_9_equals_an_uninterrupted_run(tmp_path):
    ref = _model()
    fit(ref, _examples(), tmp_path / "a", CFG, pad_id=0, dev=_examples(4), progress=False)
    out = tmp_path / "b"
    script = KILLED.format(tests=str(TESTS), tests_root=str(TESTS.parent), out=str(out),
                           threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    # killed after step 5 was taken but not checkpointed (every 2 steps, and at evals, every 3): resume replays it
    assert json.loads((out / STATE_NAME).read_text())["trainer"]["step"] == 4
    resumed = _model(seed=5)
    fit(resumed, _examples(), out, CFG, pad_id=0, dev=_examples(4), resume=True, progress=False)
    for k, v in _final(ref).items():
        assert torch.equal(_final(resumed)[k], v), k
    log_a = [json.loads(x) for x in (tmp_path / "a" / LOG_NAME).read_text().splitlines()]
    log_b = [json.loads(x) for x in (out / LOG_NAME).read_text().splitlines()]
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    pm = _model()

    def poison(state):
        if state.step == 2:
            with torch.no_grad():
                for p in pm.prefix.parameters():
                    p.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at step 3"):
        fit(pm, _examples(), tmp_path, TrainConfig(epochs=3, batch_size=4, lr=1e-2, log_every=1, checkpoint_every=1),
            pad_id=0, progress=False, on_step=poison)
    meta = json.loads((tmp_path / STATE_NAME).read_text())
    assert meta["trainer"]["step"] == 2


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    """batch 4 × accum 2 takes the same steps as batch 8 × accum 1 when no example is left over."""
    a, b = _model(dropout=0.0), _model(dropout=0.0)  # same data, no random masks: same updates
    base = dict(epochs=1, lr=1e-2, seed=3, log_every=1)
    fit(a, _examples(8), tmp_path / "a", TrainConfig(batch_size=8, grad_accum=1, **base), pad_id=0, progress=False)
    fit(b, _examples(8), tmp_path / "b", TrainConfig(batch_size=4, grad_accum=2, **base), pad_id=0, progress=False)
    for k, v in _final(a).items():
        torch.testing.assert_close(_final(b)[k], v, atol=1e-5, rtol=1e-4)


def test_gradient_accumulation_weights_every_target_token_alike(tmp_path):
    """With targets of different lengths, batch 4 × accum 2 still equals batch 8: the window's loss is the
    per-token mean over all its tokens, not the mean of the micro-batches' means."""
    g = torch.Generator().manual_seed(1)
    examples = []
    for i in range(8):
        src = torch.randint(3, 96, (3,), generator=g).tolist()
        tgt = [*torch.randint(3, 96, (1 + 3 * (i // 4),), generator=g).tolist(), 2]  # 2 tokens, then 5
        examples.append(EncodedExample(input_ids=src + tgt, labels=[-100] * len(src) + tgt, where=f"x:{i}"))
    a, b = _model(dropout=0.0), _model(dropout=0.0)
    base = dict(epochs=1, lr=1e-2, seed=3, log_every=1)
    sa = fit(a, examples, tmp_path / "a", TrainConfig(batch_size=8, grad_accum=1, **base), pad_id=0, progress=False)
    sb = fit(b, examples, tmp_path / "b", TrainConfig(batch_size=4, grad_accum=2, **base), pad_id=0, progress=False)
    assert sa.history[0]["loss"] == pytest.approx(sb.history[0]["loss"], rel=1e-5)
    for k, v in _final(a).items():
        torch.testing.assert_close(_final(b)[k], v, atol=1e-5, rtol=1e-4)


def test_train_config_names_bad_fields():
    with pytest.raises(ValueError, match=r"batch_size=0.*lr=-1"):
        TrainConfig(batch_size=0, lr=-1)


def test_char_tokenizer_decodes_what_it_encodes():
    tok = char_tokenizer()
    assert tok.decode(tok("ab c")["input_ids"]) == "ab c"


def test_group_by_length_batches_cover_each_example_once_and_cut_padding():
    g = torch.Generator().manual_seed(3)
    n, batch = 1000, 8
    lengths = torch.randint(5, 300, (n,), generator=g).tolist()
    grouped = _batches_of_epoch(n, batch, seed=1, epoch=0, lengths=lengths)
    plain = _batches_of_epoch(n, batch, seed=1, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(n))
    assert grouped == _batches_of_epoch(n, batch, seed=1, epoch=0, lengths=lengths)  # seeded: resume sees the same
    assert grouped != _batches_of_epoch(n, batch, seed=1, epoch=1, lengths=lengths)

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    # within one chunk of LENGTH_GROUP_BATCHES batches the lengths are sorted, so a batch spans little of the range
    chunk = set(i for b in plain[:LENGTH_GROUP_BATCHES] for i in b)
    in_chunk = [b for b in grouped if set(b) <= chunk]
    assert len(in_chunk) == LENGTH_GROUP_BATCHES
    assert padded_tokens(grouped) < 0.7 * padded_tokens(plain)
    assert sum(lengths) / padded_tokens(grouped) > 0.9
