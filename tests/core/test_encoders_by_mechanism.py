"""Encoders found by mechanism (no name table): P-tuning v2 on families the old table did not list."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import VOCAB, tiny_config
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from prefixtune import PrefixConfig, attach


def _classifier(model_type: str):
    torch.manual_seed(0)
    cls = getattr(transformers, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES[model_type])
    return cls(tiny_config(model_type)).eval()


@pytest.mark.parametrize("model_type", ["xlm-roberta", "camembert", "modernbert", "ernie"])
@torch.no_grad()
def test_encoder_prefix_padded_row_equals_row_alone_and_disabled_equals_base(model_type):
    model = _classifier(model_type)
    ids = torch.randint(4, VOCAB - 6, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    base = model(input_ids=ids, attention_mask=mask).logits
    pm = attach(model, PrefixConfig(prefix_length=3, reparam=False))
    assert pm.spec.kind == "encoder" and [s.name for s in pm.spec.stacks] == ["encoder"]
    with pm.disabled():
        torch.testing.assert_close(pm(input_ids=ids, attention_mask=mask).logits, base)
    pm.prefix.stacks["encoder"].table.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    both = pm(input_ids=ids, attention_mask=mask).logits
    alone = pm(input_ids=ids[1:, :3], attention_mask=mask[1:, :3]).logits
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    assert float((both - base).abs().max()) > 1e-3  # the prefix is in every layer's attention


def test_encoder_outside_the_attention_interface_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"RemBertForSequenceClassification.*attention interface"):
        attach(_classifier("rembert"), PrefixConfig(prefix_length=2))
