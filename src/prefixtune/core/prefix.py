"""The trainable prefix: a flat table (P-tuning v2) or an MLP reparameterization, and folding."""

from __future__ import annotations

import torch
from torch import nn

from prefixtune.core.config import PrefixConfig
from prefixtune.core.spec import ModelSpec


class StackPrefix(nn.Module):
    """One stack's prefix as a (P, width) matrix.

    With ``reparam``: Embedding(P, d) → Linear(d, h) → Tanh → Linear(h, width) (Li & Liang);
    without: a flat (P, width) table. ``fold()`` turns the first into the second.
    """

    def __init__(self, length: int, width: int, reparam: bool, hidden: int, embed_dim: int, init_std: float):
        super().__init__()
        self.length, self.width = length, width
        if reparam:
            self.embedding = nn.Embedding(length, embed_dim)
            self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.table = nn.Parameter(torch.randn(length, width) * init_std)

    @property
    def reparam(self) -> bool:
        return hasattr(self, "mlp")

    def forward(self) -> torch.Tensor:
        """The prefix, (P, width)."""
        if self.reparam:
            return self.mlp(self.embedding.weight)
        return self.table

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by the table it computes (no-op when already flat)."""
        if not self.reparam:
            return
        table = self.forward().detach().clone()
        del self.embedding, self.mlp
        self.table = nn.Parameter(table)

    @torch.no_grad()
    def init_to(self, target: torch.Tensor) -> float:
        """Make the output equal ``target`` (P, width); returns the max abs error left.

        Flat: copy. MLP: keep the random embedding and first layer, and solve the last
        layer by least squares, H W2ᵀ + b2 = target with H = tanh(W1 E + b1) (P × h).
        For P ≤ h the system is underdetermined and the minimum-norm solution is exact.
        """
        target = target.to(torch.float32)
        if not self.reparam:
            self.table.copy_(target)
            return 0.0
        first = self.mlp[0]
        last = self.mlp[2]
        hidden = torch.tanh(first(self.embedding.weight)).double()  # (P, h)
        mean = target.double().mean(0)
        centered = hidden - hidden.mean(0)
        w2t = torch.linalg.lstsq(centered, target.double() - mean, driver="gelsd").solution  # (h, width)
        bias = mean - hidden.mean(0) @ w2t
        last.weight.copy_(w2t.T.to(last.weight.dtype))
        last.bias.copy_(bias.to(last.bias.dtype))
        return float((self.forward() - target).abs().max())


class PrefixEncoder(nn.Module):
    """All of a model's prefix parameters: one ``StackPrefix`` per prefix-carrying stack.

    Prefix / infix modes: stack ``s`` has width layers·2·kv_dim, laid out per position as
    (layers, 2, kv_heads, head_dim) (PEFT's layout). Embedding-only mode: a single
    ``embedding`` entry of width hidden_size (virtual input embeddings).
    """

    def __init__(self, config: PrefixConfig, spec: ModelSpec):
        super().__init__()
        self.config = config
        self.spec = spec
        self.dropout = nn.Dropout(config.dropout)
        p, d = config.prefix_length, spec.hidden_size

        def make(width: int) -> StackPrefix:
            return StackPrefix(p, width, config.reparam, config.reparam_hidden, d, config.init_std)

        self.stacks = nn.ModuleDict()
        if config.mode == "embedding-only":
            self.stacks["embedding"] = make(d)
        else:
            for stack in enabled_stacks(config, spec):
                self.stacks[stack] = make(spec.stack(stack).width)

    def forward(self) -> dict[str, torch.Tensor]:
        """Each stack's prefix, (P, width), with dropout applied in training."""
        return {name: self.dropout(sp()) for name, sp in self.stacks.items()}

    def fold(self) -> None:
        for sp in self.stacks.values():
            sp.fold()

    @property
    def folded(self) -> bool:
        return not any(sp.reparam for sp in self.stacks.values())


def enabled_stacks(config: PrefixConfig, spec: ModelSpec) -> list[str]:
    """Names of the stacks of ``spec`` that get a prefix under ``config``."""
    wanted = {"encoder": config.encoder_prefix, "decoder": config.decoder_prefix, "cross": config.cross_prefix}
    names = [s.name for s in spec.stacks if wanted[s.name]]
    if not names and config.prefix_length > 0:
        raise ValueError(
            f"every prefix stack of {spec.architecture} is switched off "
            f"(it has {[s.name for s in spec.stacks]}); enable at least one"
        )
    return names
