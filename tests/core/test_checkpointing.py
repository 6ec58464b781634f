"""Gradient checkpointing recomputes each layer in the backward pass: the prefix must be there again.

Most layers thread the forward's keyword arguments (the prefix among them) down to attention, so the
recomputation sees it; StableLM's and Nemotron's decoder layers do not, and their attention finds the
prefix through the injection's record of the call in progress, which the recomputation restores.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_causal_lm

from prefixtune import PrefixConfig, attach
from prefixtune.core.inject import UNWRAPPED_ATTR


def _loss_and_grads(model_type: str, checkpointing: bool, reentrant: bool
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pm = attach(tiny_causal_lm(model_type), PrefixConfig(prefix_length=3, reparam=True, reparam_hidden=16))
    torch.manual_seed(0)
    pm.prefix.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    pm.train()
    if checkpointing:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        assert pm.is_gradient_checkpointing
    ids = torch.randint(4, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    loss = pm(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.prefix.named_parameters()}
    base = pm.detach()
    wrapped = [m for m in base.modules() if hasattr(m.__dict__.get("_gradient_checkpointing_func"), UNWRAPPED_ATTR)]
    assert not wrapped, "detach() left the layers' checkpoint functions wrapped"
    return loss.detach(), grads


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("model_type", ["stablelm", "nemotron", "llama"])
def test_checkpointed_gradients_equal_plain_gradients(model_type, reentrant):
    """Llama passes the prefix down as a keyword; StableLM and Nemotron do not. Reentrant checkpointing (not
    PrefixModel's default) backpropagated through the reparametrization MLP once per layer, and found its graph
    freed after the first: the prefix is an input of each checkpoint now."""
    loss_a, grads_a = _loss_and_grads(model_type, checkpointing=False, reentrant=reentrant)
    loss_b, grads_b = _loss_and_grads(model_type, checkpointing=True, reentrant=reentrant)
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    assert all(float(g.abs().max()) > 0 for g in grads_a.values())
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("model_type", ["bloom", "gptj"])
def test_cache_route_refuses_checkpointing_in_training_naming_why(model_type):
    """The cache route's prefix is the layers' KV cache, which checkpointed layers are not given in training:
    refused with the reason (it failed on a shape mismatch deep in attention before); without it, it trains."""
    pm = attach(tiny_causal_lm(model_type), PrefixConfig(prefix_length=3, reparam=False))
    assert pm.spec.route == "cache"
    ids = torch.randint(4, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    pm.train()
    pm.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match=r"carries its prefix in the KV cache.*gradient checkpointing"):
        pm(input_ids=ids, labels=ids)
    pm.gradient_checkpointing_disable()
    pm(input_ids=ids, labels=ids).loss.backward()
    assert float(pm.prefix.stacks["decoder"].table.grad.abs().max()) > 0
    pm.detach()
