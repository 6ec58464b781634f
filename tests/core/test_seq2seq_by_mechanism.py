"""Encoder-decoders found by mechanism: every supported family carries encoder, decoder and cross prefixes.

The list is what ``scripts/support_matrix.py`` finds supported (docs/support.md, "Encoder-decoders"); each is
checked on a tiny model built from the family's own config (``reference.seq2seq_contract``).
"""

from __future__ import annotations

import pytest
from reference import seq2seq_contract
from tiny_models import tiny_seq2seq_lm

from prefixtune import PrefixConfig, attach

SUPPORTED = [  # docs/support.md, "Encoder-decoders", supported
    "bart", "blenderbot", "blenderbot-small", "encoder-decoder", "m2m_100", "marian", "mbart", "mt5", "nllb-moe",
    "pegasus", "plbart", "seamless_m4t", "seamless_m4t_v2", "switch_transformers", "t5", "umt5",
]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("model_type", SUPPORTED)
def test_encoder_decoder_carries_three_prefixes_and_generates_as_it_computes(model_type):
    seq2seq_contract(tiny_seq2seq_lm(model_type))


@pytest.mark.parametrize(("model_type", "reason"), [
    # the encoder's attention is outside the interface: before, these were accepted with decoder and cross
    # prefixes only, and the encoder silently carried none
    ("longt5", "its encoder attention does not go through"),
    ("pegasus_x", "its encoder attention does not go through"),
    ("bigbird_pegasus", "its encoder attention does not go through"),
    ("fsmt", "computes attention inside its own module"),
])
def test_encoder_decoders_without_all_three_prefixes_are_refused(model_type, reason):
    model = tiny_seq2seq_lm(model_type)
    with pytest.raises(ValueError) as err:
        attach(model, PrefixConfig(prefix_length=2))
    assert type(model).__name__ in str(err.value) and reason in str(err.value)
