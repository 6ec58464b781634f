"""A running batch: the requests decoded together and the one KV cache and mask they share.

The rows, the cache and the (B, L) mask change together (a row joins, decodes a token, leaves), so
one object owns all three and every change goes through its methods. Layout (``core/cache.py``): one
``DynamicCache`` left-padded to a common length L; row r's real columns (its prefix, then its tokens)
have mask 1, and its next token's position is the count of its real columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefixtune.core.cache import SlotCache, keep_cache_rows, merge_caches
from prefixtune.serving.generation import Generation


@dataclass(slots=True, eq=False)
class Sequence:
    """Engine-private state of one request: its prefix K/V, its generator, its last sampled token.

    ``solo`` requests (seeded sampling) are computed in a batch of their own, so that their logits,
    and therefore their tokens, do not depend on which other requests are running."""

    gen: Generation
    prefix_length: int
    kv: torch.Tensor | None  # (P, layers, 2, kv_heads, head_dim), the registry's tensor, or None
    generator: torch.Generator | None
    solo: bool = False
    pending: int = -1  # sampled but not yet in the cache


@dataclass(slots=True, eq=False)
class ChunkedPrefill:
    """A request whose prompt is prefilled over several steps (``EngineConfig.prefill_chunk``): its own
    one-row cache and (1, L) mask (all ones: its prefix, then the prompt tokens prefilled so far)."""

    seq: Sequence
    cache: object
    mask: torch.Tensor
    done: int = 0  # prompt tokens already in the cache

    @property
    def remaining(self) -> int:
        return len(self.seq.gen.prompt_ids) - self.done

    def chunk_inputs(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (1, n), positions (1, n), mask (1, L + n)) for the next ``n`` prompt tokens."""
        device = self.mask.device
        ids = torch.tensor([self.seq.gen.prompt_ids[self.done:self.done + n]], dtype=torch.long, device=device)
        start = self.mask.shape[1]  # every column is real: the positions continue from them
        positions = torch.arange(start, start + n, device=device)[None]
        return ids, positions, torch.cat([self.mask, self.mask.new_ones(1, n)], dim=1)

    def prefilled(self, mask: torch.Tensor, n: int) -> None:
        """The forward appended ``n`` prompt tokens to the cache; the mask follows."""
        self.mask, self.done = mask, self.done + n


class RunningBatch:
    """Rows decoding together; owns their cache ((B, kv_heads, L, head_dim) per layer) and mask (B, L)."""

    def __init__(self) -> None:
        self.rows: list[Sequence] = []
        self.cache = None
        self.mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        """L, the cached columns (0 when empty)."""
        return 0 if self.mask is None else self.mask.shape[1]

    def join(self, rows: list[Sequence], cache: object, mask: torch.Tensor) -> None:
        """Add prefilled ``rows`` with their cache and (R, L_r) mask (left-padded to a common length)."""
        if self.cache is None:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        self.cache = merge_caches(self.cache, cache)
        length = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(mask, length)], dim=0)
        self.rows.extend(rows)

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (B, 1), positions (B, 1), mask (B, L + 1)) feeding every row its pending token."""
        device = self.mask.device
        ids = torch.tensor([[r.pending] for r in self.rows], dtype=torch.long, device=device)
        positions = self.mask.sum(-1, keepdim=True)  # real columns before the new token
        return ids, positions, torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)

    def decoded(self, mask: torch.Tensor) -> None:
        """The forward appended one column to the cache; the mask follows."""
        self.mask = mask

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """The rows' logits: (B, V), one per row already."""
        return logits

    def drop_finished(self) -> None:
        """Take finished rows out of the rows, the cache and the mask; drop columns left all padding."""
        keep = [i for i, r in enumerate(self.rows) if not r.gen.done]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        mask = self.mask[keep]
        drop = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns that are padding everywhere
        order = keep_cache_rows(self.cache, keep, drop)  # the cache may reorder the kept rows
        self.rows = [self.rows[i] for i in order]
        self.mask = self.mask[order, drop:]

    def clear(self) -> list[Sequence]:
        """Empty the batch; returns the rows it held."""
        rows, self.rows, self.cache, self.mask = self.rows, [], None, None
        return rows


def _bucket(n: int, least: int) -> int:
    """The power of two >= max(n, least): a handful of shapes, so a handful of compiled graphs."""
    return 1 << (max(n, least) - 1).bit_length()


class StaticBatch:
    """Rows decoding together in fixed shapes (``kv_cache="static"``): a ``SlotCache`` of (slots, capacity)
    columns, row r in slot ``slots[r]``, left-aligned (its prefix, then its tokens, from column 0), and an
    additive (slots, capacity) mask in the model's dtype (0 on real columns, the dtype's minimum elsewhere).

    Every decode step feeds all slots (free ones too: a dummy token, masked everywhere) at their own write
    column, so the shapes change only when a join needs more slots or a row outgrows the columns (each
    doubles: a handful of shapes per run). Joining rows are copied into free slots; leaving rows only free
    theirs."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.rows: list[Sequence] = []
        self.slots: list[int] = []
        self.ends: list[int] = []  # each row's write column (its real columns), kept here: no device sync
        self.cache: SlotCache | None = None
        self.bias: torch.Tensor | None = None
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list[Sequence], cache: object, mask: torch.Tensor) -> None:
        """Copy prefilled ``rows`` (their cache, (R, L) mask of real columns) into free slots."""
        columns = [m.nonzero().flatten() for m in mask]
        need = max(len(c) for c in columns) + 1  # room for each row's next token
        if self.cache is None:
            self.cache = SlotCache(cache, _bucket(len(rows), 1), _bucket(need, 64))
            self.bias = torch.full(self.cache.shape, torch.finfo(self.dtype).min, dtype=self.dtype,
                                   device=mask.device)
        else:
            self._grow(len(self.rows) + len(rows), need)
        free = sorted(set(range(self.cache.shape[0])) - set(self.slots))
        for i, (seq, cols) in enumerate(zip(rows, columns, strict=True)):
            slot = free[i]
            self.cache.place(slot, cache, i, cols)
            self.bias[slot] = torch.finfo(self.dtype).min
            self.bias[slot, :len(cols)] = 0
            self.rows.append(seq)
            self.slots.append(slot)
            self.ends.append(len(cols))

    def _grow(self, slots: int, columns: int) -> None:
        """At least ``slots`` slots of ``columns`` columns (each doubled as needed: new buffers, new shapes)."""
        old = self.cache.shape
        if slots <= old[0] and columns <= old[1]:
            return
        self.cache = self.cache.grown(_bucket(slots, old[0]), _bucket(columns, old[1]))
        bias = torch.full(self.cache.shape, torch.finfo(self.dtype).min, dtype=self.dtype, device=self.bias.device)
        bias[:old[0], :old[1]] = self.bias
        self.bias = bias

    def decode_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (S, 1), positions (S, 1), mask (S, 1, 1, capacity)) for every slot; a row's new column is
        made visible first (its position: the count of its real columns, i.e. its write column). The
        capacity doubles when a row's next column would pass it (rows grow as they decode, not up front)."""
        self._grow(len(self.rows), max(self.ends) + 1)
        write = self.cache.write
        ids = torch.zeros(len(write), 1, dtype=torch.long, device=write.device)
        live = torch.tensor(self.slots, dtype=torch.long, device=write.device)
        ids[live, 0] = torch.tensor([r.pending for r in self.rows], dtype=torch.long, device=write.device)
        self.bias[live, write[live]] = 0
        return ids, write[:, None].clone(), self.bias[:, None, None, :]

    def decoded(self, mask: torch.Tensor) -> None:
        """The forward wrote one column per slot; the live slots move on (free slots stay at column 0)."""
        self.cache.write[torch.tensor(self.slots, dtype=torch.long, device=mask.device)] += 1
        self.ends = [e + 1 for e in self.ends]

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """The rows' logits (len(rows), V) out of the slots' (S, V)."""
        return logits[torch.tensor(self.slots, dtype=torch.long, device=logits.device)]

    def drop_finished(self) -> None:
        """Free the slots of finished rows (their columns masked, their write column back to 0)."""
        keep = [i for i, r in enumerate(self.rows) if not r.gen.done]
        if len(keep) == len(self.rows):
            return
        for i in set(range(len(self.rows))) - set(keep):
            self.bias[self.slots[i]] = torch.finfo(self.dtype).min
            self.cache.write[self.slots[i]] = 0
        self.rows = [self.rows[i] for i in keep]
        self.slots = [self.slots[i] for i in keep]  # the buffers stay (a compiled step keeps its addresses)
        self.ends = [self.ends[i] for i in keep]

    def clear(self) -> list[Sequence]:
        """Empty the batch (its buffers are released); returns the rows it held."""
        rows, self.rows, self.slots, self.ends, self.cache, self.bias = self.rows, [], [], [], None, None
        return rows


def _left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) → (B, length) with zeros in front."""
    return torch.nn.functional.pad(mask, (length - mask.shape[1], 0))
