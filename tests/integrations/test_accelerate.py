"""accelerate's save_state / load_state on a prepared PrefixModel: the saved model file holds the prefix only,
and loading it back restores the prefix (and the optimizer) exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny

from prefixtune.core.config import PrefixConfig
from prefixtune.core.model import attach

accelerate = pytest.importorskip("accelerate")


def test_accelerate_save_and_load_state_hold_and_restore_the_prefix_only(tmp_path):
    torch.manual_seed(0)
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=3, reparam_hidden=16))
    acc = accelerate.Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    model, opt = acc.prepare(pm, opt)
    ids = torch.randint(3, 90, (2, 8))
    acc.backward(model(input_ids=ids, labels=ids).loss)
    opt.step()
    saved = {k: v.detach().clone() for k, v in pm.state_dict().items()}
    moments = opt.state_dict()["state"][0]["exp_avg"].clone()
    acc.save_state(str(tmp_path / "state"))

    files = list((tmp_path / "state").glob("model*.safetensors"))
    assert len(files) == 1 and set(load_file(files[0])) == set(saved)
    assert all(k.startswith("prefix.") for k in saved)
    acc.backward(model(input_ids=ids, labels=ids).loss)
    opt.step()  # move away from the saved state
    assert any(not torch.equal(v, saved[k]) for k, v in pm.state_dict().items())

    acc.load_state(str(tmp_path / "state"))
    for key, value in pm.state_dict().items():
        assert torch.equal(value, saved[key])
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], moments)
