"""Per-request sampling parameters and next-token choice, independent of the rest of the batch.

Each sampled request owns a ``torch.Generator`` seeded from its ``seed``; its row of logits is
filtered and sampled on its own, so the tokens it gets depend only on its logits and its seed. (The
engine computes a seeded request's logits in a forward of its own, so that they, too, do not depend
on the batch: see ``engine.py``.)

Sampling is done in float64 with the maximum subtracted before dividing by the temperature, so any
temperature in (0, 100] and any top_p in (0, 1] give a valid distribution: a temperature so small
that the scaled logits overflow float32 (1e-40) becomes argmax among the tied maxima, and the most
likely token always survives top-p.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request chooses its tokens.

    Attributes:
        max_new_tokens: generate at most this many tokens (>= 1).
        temperature: 0 = greedy (argmax); > 0 divides the logits before sampling.
        top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p (0, 1].
        seed: seed of the request's own generator (sampling only); None draws one at random.
        stop_token_ids: finish (reason "stop") after generating any of these ids (it is kept in the output).
        ignore_eos: do not stop at the model's end-of-sequence ids (benchmarks with a fixed length).
    """

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, int | float) \
                or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be a number in [0, 100] (0 = greedy), got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a tuple of token ids >= 0, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The request's own generator (None for greedy), seeded from ``params.seed`` or at random."""
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row of logits (V,): argmax when greedy, else temperature + top-p sampling."""
    if params.greedy:
        return int(logits.argmax())
    scaled = logits.double()
    scaled = (scaled - scaled.max()) / params.temperature  # <= 0 everywhere, 0 at the maxima: never inf - inf
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True, stable=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        drop = before >= params.top_p
        drop[0] = False  # the most likely token always stays, however small top_p is
        choice = torch.multinomial(sorted_probs.masked_fill(drop, 0.0), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
