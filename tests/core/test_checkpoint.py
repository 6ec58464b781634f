"""Saving, loading, fingerprints, and PEFT interop."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import VOCAB, tiny

from prefixtune import PrefixConfig, attach, load
from prefixtune.core.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from prefixtune.io.peft import export_peft, import_peft


def _ids(b=2, t=6, seed=1):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _inputs(name):
    inputs = {"input_ids": _ids()}
    if name == "t5":
        inputs["decoder_input_ids"] = _ids(2, 4, seed=5)
    return inputs


@pytest.mark.parametrize("name", ["llama", "t5"])
@pytest.mark.parametrize("fold", [True, False])
@torch.no_grad()
def test_save_load_roundtrip_is_bit_identical(tmp_path, name, fold):
    pm = attach(tiny(name), PrefixConfig(prefix_length=4, reparam=True, reparam_hidden=16))
    ref = pm(**_inputs(name)).logits
    pm.save_pretrained(tmp_path, fold=fold)
    saved = load_file(str(tmp_path / WEIGHTS_NAME))
    stacks = [s.name for s in pm.spec.stacks]
    if fold:
        assert set(saved) == {f"{s}.table" for s in stacks}
    else:
        assert set(saved) == {f"{s}.{k}" for s in stacks
                              for k in ("embedding.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias")}
    loaded = load(tmp_path, tiny(name))
    out = loaded(**_inputs(name)).logits
    if fold:
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)  # the MLP was computed once more
        again = tmp_path / "again"
        loaded.save_pretrained(again)
        assert torch.equal(load(again, tiny(name))(**_inputs(name)).logits, out)
    else:
        assert torch.equal(out, ref)
        assert loaded.prefix_config.reparam


def test_wrong_base_model_is_refused(tmp_path):
    pm = attach(tiny("llama", seed=0), PrefixConfig(prefix_length=2, reparam=False))
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="weights_sha256"):
        load(tmp_path, tiny("llama", seed=1))  # same shapes, other weights
    with pytest.raises(ValueError, match=r"model_type: saved 'llama', this model 'qwen3'"):
        load(tmp_path, tiny("qwen3"))


def test_tampered_or_half_written_save_is_refused(tmp_path):
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=2, reparam=False))
    pm.save_pretrained(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match="does not match"):
        load(tmp_path, tiny("llama"))
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"prefix_config.json: not valid JSON \(line 1"):
        load(tmp_path, tiny("llama"))
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files are left behind"


def test_bad_config_field_is_named(tmp_path):
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=2, reparam=False))
    pm.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["prefix_config"]["prefix_lenght"] = 3
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="prefix_lenght"):
        load(tmp_path, tiny("llama"))


# PEFT's own code calls deprecated transformers APIs; only ours must be warning-free.
PEFT_WARNINGS = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


@PEFT_WARNINGS
@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen3"])
@torch.no_grad()
def test_peft_export_gives_the_same_logits_in_peft(tmp_path, name):
    peft = pytest.importorskip("peft")
    pm = attach(tiny(name), PrefixConfig(prefix_length=5, reparam=True, reparam_hidden=16))
    ids = _ids()
    ours = pm(input_ids=ids).logits
    export_peft(pm, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny(name), str(tmp_path)).eval()
    theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

    # and back: a PEFT checkpoint imports to the same logits
    back = import_peft(tmp_path, tiny(name))
    torch.testing.assert_close(back(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)


@PEFT_WARNINGS
@torch.no_grad()
def test_peft_trained_checkpoint_imports(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                  encoder_hidden_size=16)
    peft_model = peft.get_peft_model(tiny("llama"), cfg)
    peft_model.save_pretrained(str(tmp_path))
    peft_model.eval()
    ids = _ids()
    theirs = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    ours = import_peft(tmp_path, tiny("llama"))(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_import_rejects_a_mismatched_adapter(tmp_path):
    pm = attach(tiny("llama"), PrefixConfig(prefix_length=2, reparam=False))
    export_peft(pm, tmp_path)
    with pytest.raises(ValueError, match=r"needs \[P, 2·2·32 = 128\]"):
        import_peft(tmp_path, tiny("qwen3"))
