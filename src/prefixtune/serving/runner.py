"""The model runner: every forward the engine makes over its KV caches, and the checks of its fast paths.

The engine decides what runs (scheduler), holds the rows (batches) and samples; this module runs the
frozen model: a prefill of a group left-padded to its longest prompt, a packed prefill (one row, each
request kept to its own prefix and tokens: ``core/cache.py``), and single forwards for chunks and decode
steps (the decode one compiled on first use with ``compile_decode``). Two fast paths are used only where
they are exact on the model at hand, each checked once when the engine is built against the plain path:
packing (``packing_refused``) and the fixed-shape "static" decode layout (``static_refused``).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from torch import nn

from prefixtune.core.cache import (
    Layout,
    Segment,
    cache_from_prefixes,
    packed_attention,
    packing_refused_now,
    unpack_rows,
)
from prefixtune.core.spec import StackSpec
from prefixtune.serving.batch import RunningBatch, Sequence, StaticBatch
from prefixtune.serving.generation import Generation
from prefixtune.serving.sampling import SamplingParams

Rows = tuple[torch.Tensor, object, torch.Tensor]  # last-token logits (R, V) float32, the rows' cache, (R, L) mask


def _tolerance(dtype: torch.dtype, want: torch.Tensor) -> float:
    """The check's absolute tolerance: float32 rounding, or bf16 / fp16's, scaled by the logits."""
    return (1e-4 if dtype == torch.float32 else 3e-2) * (1 + want.abs().max().item())


class ModelRunner:
    """Forwards of ``model`` on ``device`` / ``dtype``; prefill caches in ``prefill_layout``.

    compile_mode: "off" or a ``torch.compile`` mode for decode steps; ``static_decode`` (set by the
    engine once it knows its layout) compiles them with static shapes instead of dynamic ones."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, prefill_layout: Layout,
                 compile_mode: str = "off", pad_id: int = 0, position_padding_idx: int | None = None,
                 stack: StackSpec | None = None) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.stack = stack  # the decoder's StackSpec: cuts flat (P, width) prefixes (layers that differ) per layer
        # RoBERTa-like embeddings number positions from padding_idx + 1 (``ModelSpec.position_padding_idx``);
        # the engine counts from 0 (P_r + index), so every forward adds this to its position ids
        self.position_offset = 0 if position_padding_idx is None else position_padding_idx + 1
        self.prefill_layout, self.compile_mode, self.pad_id = prefill_layout, compile_mode, pad_id
        self.static_decode = False
        self.decode_model: nn.Module | None = None  # compiled on first use

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: object,
                decode: bool = False) -> torch.Tensor:
        """ids, positions (B, T); mask (B, cached + T), or a static batch's additive (B, 1, 1, capacity).
        Returns the last position's logits (B, V) float32."""
        model = self.model
        if decode and self.compile_mode != "off":
            if self.decode_model is None:
                mode = None if self.compile_mode == "default" else self.compile_mode
                self.decode_model = torch.compile(self.model, mode=mode, dynamic=not self.static_decode)
            model = self.decode_model
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions + self.position_offset,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def group_prefill(self, kvs: list[torch.Tensor | None], prompts: list[Seq[int]]) -> Rows:
        """Prefill of R requests (prefix K/V (P_r, layers, 2, kv_heads, head_dim) or None, prompt), left-padded
        to the longest prompt: the rows' mask is (R, P_max + T)."""
        cache, prefix_mask = cache_from_prefixes(kvs, self.device, self.dtype, self.prefill_layout, self.stack)
        t = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), t), self.pad_id, dtype=torch.long, device=self.device)
        token_mask = torch.zeros(len(prompts), t, dtype=torch.long, device=self.device)
        for i, prompt in enumerate(prompts):
            ids[i, t - len(prompt):] = torch.tensor(prompt, device=self.device)
            token_mask[i, t - len(prompt):] = 1
        mask = torch.cat([prefix_mask, token_mask], dim=1)  # (G, P_max + T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]  # P_r + index among the row's tokens
        return self.forward(ids, mask, positions, cache), cache, mask

    def packed_prefill(self, kvs: list[torch.Tensor | None], prompts: list[Seq[int]]) -> Rows:
        """Packed prefill of R requests (as ``group_prefill``'s): ids (1, sum of prompt lengths), each
        distinct prefix once in the row's past, positions P_r + index per request; then one row each."""
        starts: dict[int, int] = {}
        distinct: list[torch.Tensor] = []
        past = 0
        for kv in kvs:
            if kv is not None and kv.shape[0] and id(kv) not in starts:
                starts[id(kv)], past = past, past + kv.shape[0]
                distinct.append(kv)
        segments, positions, start = [], [], 0
        for kv, prompt in zip(kvs, prompts, strict=True):
            p = 0 if kv is None else kv.shape[0]
            segments.append(Segment(starts.get(id(kv), 0), p, start, len(prompt)))
            positions.append(torch.arange(p, p + len(prompt)))
            start += len(prompt)
        cache, _ = cache_from_prefixes([torch.cat(distinct) if distinct else None], self.device, self.dtype,
                                       stack=self.stack)
        ids = torch.tensor([t for prompt in prompts for t in prompt], dtype=torch.long, device=self.device)[None]
        last = torch.tensor([s.start + s.length - 1 for s in segments], device=self.device)
        with packed_attention(self.model, segments):
            out = self.model(input_ids=ids,
                             position_ids=torch.cat(positions).to(self.device)[None] + self.position_offset,
                             past_key_values=cache, use_cache=True, logits_to_keep=last)
        logits = out.logits[0].float()
        if logits.shape[0] != len(segments):
            raise ValueError(f"{type(self.model).__name__} gave {tuple(out.logits.shape)} logits for "
                             f"logits_to_keep of {len(segments)} positions")
        rows, mask = unpack_rows(cache, segments, self.prefill_layout)
        return logits, rows, mask

    # ------------------------------------------------------------------ the checks (once per engine)
    def _probe(self, position_shape: tuple[int, ...], vocab_size: int
               ) -> tuple[list[torch.Tensor | None], list[tuple[int, ...]]]:
        """Two probe requests: a random 3-position prefix with a 5-token prompt, and no prefix with 4."""
        g = torch.Generator().manual_seed(0)
        kv = torch.randn(3, *position_shape, generator=g).to(self.device, self.dtype)
        return [kv, None], [tuple(3 + i % (vocab_size - 3) for i in range(5)), (4, 3, 5, 4)]

    def batching_refused(self, position_shape: tuple[int, ...], vocab_size: int) -> str | None:
        """None if rows of different lengths share a batch exactly (two requests, one with a prefix, left-padded
        into one prefill and one decode step, against each alone); otherwise why each request needs a batch of
        its own (a model whose attention does not honour the mask over cached padding)."""
        kvs, prompts = self._probe(position_shape, vocab_size)
        try:
            with torch.no_grad():
                logits, cache, mask = self.group_prefill(kvs, prompts)
                nxt = logits.argmax(-1, keepdim=True)
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                step = self.forward(nxt, mask, mask.sum(-1, keepdim=True) - 1, cache, decode=True)
                for r, (k, prompt) in enumerate(zip(kvs, prompts, strict=True)):
                    first, alone, own = self.group_prefill([k], [prompt])
                    own = torch.cat([own, torch.ones_like(nxt[r:r + 1])], dim=1)
                    second = self.forward(nxt[r:r + 1], own, own.sum(-1, keepdim=True) - 1, alone, decode=True)[0]
                    for got, want, what in ((logits[r], first[0], "prefill"), (step[r], second, "decode")):
                        if not torch.allclose(got, want, rtol=0, atol=_tolerance(self.dtype, want)):
                            return (f"a left-padded row's {what} logits differ from the request alone by "
                                    f"{(got - want).abs().max().item():.3g}")
        except Exception as exc:  # a model that cannot run rows of different lengths together
            return f"a batch of two rows failed: {type(exc).__name__}: {exc}"
        return None

    def packing_refused(self, position_shape: tuple[int, ...], vocab_size: int) -> str | None:
        """None if a packed prefill gives this model's logits and cache (two requests, one with a
        prefix, against each alone); otherwise the reason packing is not used."""
        refused = packing_refused_now(self.model)
        if refused is not None:
            return refused
        kvs, prompts = self._probe(position_shape, vocab_size)
        try:
            with torch.no_grad():
                logits, cache, _ = self.packed_prefill(kvs, prompts)
                for r, (k, prompt) in enumerate(zip(kvs, prompts, strict=True)):
                    alone, prefix_mask = cache_from_prefixes([k], self.device, self.dtype, stack=self.stack)
                    ids = torch.tensor([prompt], device=self.device)
                    full = torch.cat([prefix_mask, torch.ones_like(ids)], dim=1)
                    positions = (full.cumsum(-1) - 1)[:, -len(prompt):]
                    want = self.forward(ids, full, positions, alone)[0]
                    tol = _tolerance(self.dtype, want)
                    if not torch.allclose(logits[r], want, rtol=0, atol=tol):
                        return (f"packed logits differ from the request alone by "
                                f"{(logits[r] - want).abs().max().item():.3g}")
                    n = alone.get_seq_length()  # its real columns (prefix and prompt), at the right of its row
                    for mine, ref in zip(cache.layers, alone.layers, strict=True):
                        for got, exp in ((mine.keys[r, :, -n:], ref.keys[0]), (mine.values[r, :, -n:], ref.values[0])):
                            if not torch.allclose(got, exp, rtol=0, atol=tol):
                                return f"packed K/V differ from the request alone by {(got - exp).abs().max():.3g}"
        except Exception as exc:  # a model that cannot run packed: the reason, and the grouped prefill
            return f"packed forward failed: {type(exc).__name__}: {exc}"
        return None

    def static_refused(self, position_shape: tuple[int, ...], vocab_size: int) -> str | None:
        """None if two decode steps in the static layout give the logits of the preallocated one (the two
        probe requests in one batch); otherwise the reason the static layout is not used."""
        kvs, prompts = self._probe(position_shape, vocab_size)
        steps: list[list[torch.Tensor]] = []
        try:
            with torch.no_grad():
                for batch in (RunningBatch(), StaticBatch(self.dtype)):
                    rows = [Sequence(Generation("static-check", p, SamplingParams(max_new_tokens=4), None, None),
                                     0 if k is None else k.shape[0], k, None)
                            for p, k in zip(prompts, kvs, strict=True)]
                    _, cache, mask = self.group_prefill(kvs, prompts)
                    batch.join(rows, cache, mask)
                    steps.append([])
                    for token in (5, 6):
                        for row in rows:
                            row.pending = token
                        ids, positions, mask = batch.decode_inputs()
                        steps[-1].append(batch.select(self.forward(ids, mask, positions, batch.cache)))
                        batch.decoded(mask)
        except Exception as exc:  # a model that cannot decode in fixed shapes: the reason, and preallocated
            return f"static decode failed: {type(exc).__name__}: {exc}"
        for want, got in zip(*steps, strict=True):
            if not torch.allclose(got, want, rtol=0, atol=_tolerance(self.dtype, want)):
                return f"static decode logits differ from the preallocated cache's by {(got - want).abs().max():.3g}"
        return None
