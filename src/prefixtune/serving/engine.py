"""Batched multi-prefix generation over token ids: many prefixes, one frozen model.

The engine knows nothing about tokenization or HTTP: token ids in, token ids out. It holds one
decoder-only base model, a registry of named prefixes (any lengths), and runs requests with
continuous batching: waiting requests (a bounded queue) join the running batch between decode
steps, finished or cancelled ones leave it.

How a mixed batch runs. A prefix is exactly a KV cache of P past tokens (the core's equivalence,
``tests/test_model.py``), so each row's prefix is placed in the batch's ``DynamicCache`` as P past
positions, in front of the row's own tokens. One cache holds every running row, left-padded to a
common length; a (B, L) mask marks each row's real columns (its prefix and its tokens), and each
new token's position is the count of real columns before it (P_r + tokens so far), exactly where
``PrefixModel.generate`` puts it. A row therefore attends only to its own prefix and its own tokens,
and decoding with a prefix costs P more cached columns, nothing per step. Joining requests are
prefilled together (their prefixes right-aligned in a fresh cache, prompts left-padded) and merged
into the running cache; the cache surgery lives in ``inject.py``.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prefixtune.core.cache import cache_from_prefixes, keep_cache_rows, merge_caches
from prefixtune.core.model import PrefixModel
from prefixtune.core.spec import read_spec
from prefixtune.errors import QueueFullError, UnknownPrefixError
from prefixtune.serving.generation import EventCallback, FinishReason, Generation
from prefixtune.serving.sampling import SamplingParams, make_generator, next_tokens

logger = logging.getLogger(__name__)

COUNTERS = ("requests_submitted", "requests_rejected", "requests_stop", "requests_length", "requests_cancelled",
            "requests_error", "prompt_tokens", "generated_tokens", "steps", "decoded_rows")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Bounds of the engine.

    Attributes:
        max_batch_size: most requests decoded together (rows of the running batch).
        max_waiting: most requests waiting to join; ``submit`` raises ``QueueFullError`` beyond it.
        max_prefill_batch: most waiting requests prefilled together when they join.
        max_context: most positions per request (prefix + prompt + new tokens); None: the model's
            ``max_position_embeddings``.
    """

    max_batch_size: int = 32
    max_waiting: int = 256
    max_prefill_batch: int = 8
    max_context: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_waiting", "max_prefill_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_context is not None and (not isinstance(self.max_context, int) or self.max_context < 2):
            raise ValueError(f"max_context must be None or an integer >= 2, got {self.max_context!r}")


@dataclass(slots=True)
class _Row:
    """Engine-private state of a request: its prefix K/V, its generator, its last sampled token."""

    gen: Generation
    kv: torch.Tensor | None  # (P, layers, 2, kv_heads, head_dim) or None
    generator: torch.Generator | None
    pending: int = -1  # sampled but not yet in the cache


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for monitoring: queue depth, batch size, request and token counters."""

    waiting: int
    running: int
    counters: dict[str, int]


class Engine:
    """One frozen decoder-only model serving any number of named prefixes with continuous batching.

    ``submit`` (any thread) queues a request and returns its ``Generation``; ``step`` runs one
    round (admit, prefill, decode); ``start`` runs rounds in a background thread. ``generate`` is
    the synchronous convenience for lists of requests.
    """

    def __init__(self, model: nn.Module, config: EngineConfig | None = None,
                 eos_token_ids: Sequence[int] | None = None) -> None:
        self.spec = read_spec(model)
        if self.spec.kind != "causal":
            raise ValueError(f"the engine serves decoder-only models; {self.spec.architecture} is {self.spec.kind}")
        layer_types = getattr(model.config, "layer_types", None) or ()
        if any("sliding" in str(t) for t in layer_types):
            raise ValueError(f"{self.spec.architecture} uses sliding-window attention, which would slide the "
                             "prefix out of view; the engine supports full attention only")
        self.model = model.eval()
        self.config = config or EngineConfig()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if eos_token_ids is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_context = self.config.max_context or getattr(model.config, "max_position_embeddings", None) or 2**31
        self._pad_id = 0
        self._prefixes: dict[str, torch.Tensor | None] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: deque[_Row] = deque()
        self._running: list[_Row] = []
        self._cache = None  # DynamicCache of the running rows, (B, kv_heads, L, head_dim) per layer
        self._mask: torch.Tensor | None = None  # (B, L) long: 1 = a real column (prefix or token)
        # every key exists from the start, so that stats() can copy the dict while the loop counts
        self._counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ prefixes
    def add_prefix(self, name: str, source: PrefixModel | str | Path | torch.Tensor) -> int:
        """Register (or replace) prefix ``name``; returns its length P.

        source: a ``PrefixModel`` on this engine's base model, a ``save_pretrained`` folder, or the
        K/V tensor (P, layers, 2, kv_heads, head_dim).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"prefix name must be a non-empty string, got {name!r}")
        if isinstance(source, PrefixModel):
            if source.base is not self.model:
                from prefixtune.core.checkpoint import compare_fingerprints, fingerprint

                compare_fingerprints(fingerprint(source.base), fingerprint(self.model), f"prefix {name!r}")
            kv = source.decoder_kv()
        elif isinstance(source, str | Path):
            from prefixtune.core.checkpoint import load_prefix_kv

            kv = load_prefix_kv(source, self.model)
        else:
            kv = source
        stack = self.spec.stack("decoder")
        expected = (stack.num_layers, 2, stack.num_kv_heads, stack.head_dim)
        if kv is not None and (kv.ndim != 5 or tuple(kv.shape[1:]) != expected):
            raise ValueError(f"prefix {name!r}: K/V of shape {tuple(kv.shape)}, expected (P, *{expected})")
        kv = None if kv is None or kv.shape[0] == 0 else kv.detach().to(self.device, self.dtype).contiguous()
        with self._lock:
            self._prefixes[name] = kv
        return 0 if kv is None else kv.shape[0]

    def remove_prefix(self, name: str) -> None:
        """Unregister ``name``; requests already submitted keep using it."""
        with self._lock:
            if self._prefixes.pop(name, False) is False:
                raise UnknownPrefixError(f"unknown prefix {name!r}")

    def prefix_length(self, name: str | None) -> int:
        """P of prefix ``name`` (0 for None, the base model); UnknownPrefixError if not registered."""
        if name is None:
            return 0
        with self._lock:
            if name not in self._prefixes:
                raise UnknownPrefixError(f"unknown prefix {name!r}")
            kv = self._prefixes[name]
        return 0 if kv is None else kv.shape[0]

    def prefix_names(self) -> list[str]:
        with self._lock:
            return sorted(self._prefixes)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, prefix: str | None = None,
               request_id: str | None = None, on_event: EventCallback | None = None) -> Generation:
        """Queue a request (thread-safe); ``prefix=None`` runs the base model.

        Raises ValueError (bad prompt or too long, naming the request and field), UnknownPrefixError,
        or QueueFullError when ``max_waiting`` requests are already waiting.
        """
        params = params or SamplingParams()
        rid = request_id or f"req-{next(self._ids)}"
        ids = tuple(int(t) for t in prompt_ids)
        if not ids:
            raise ValueError(f"request {rid}: prompt_ids is empty")
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.spec.vocab_size), None)
        if bad is not None:
            raise ValueError(f"request {rid}: prompt_ids[{bad}] = {ids[bad]} is outside the vocabulary "
                             f"[0, {self.spec.vocab_size})")
        with self._wake:
            if prefix is not None and prefix not in self._prefixes:
                names = sorted(self._prefixes)
                raise UnknownPrefixError(f"request {rid}: unknown prefix {prefix!r}; registered: {names[:20]}")
            kv = self._prefixes.get(prefix) if prefix is not None else None
            total = (0 if kv is None else kv.shape[0]) + len(ids) + params.max_new_tokens
            if total > self.max_context:
                raise ValueError(f"request {rid}: prefix + prompt_ids ({total - params.max_new_tokens}) + "
                                 f"max_new_tokens ({params.max_new_tokens}) = {total} exceeds the context of "
                                 f"{self.max_context} positions")
            if len(self._waiting) >= self.config.max_waiting:
                self._counters["requests_rejected"] += 1
                raise QueueFullError(f"request {rid}: {len(self._waiting)} requests already waiting "
                                     f"(max_waiting={self.config.max_waiting})")
            gen = Generation(rid, ids, params, prefix, on_event)
            self._waiting.append(_Row(gen, kv, make_generator(params, self.device)))
            self._counters["requests_submitted"] += 1
            self._wake.notify()
        return gen

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None
                 = None, prefixes: Sequence[str | None] | None = None) -> list[list[int]]:
        """Run a list of requests to the end (in this thread, or waiting on the running engine thread)."""
        n = len(prompts)
        plist = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * n
        names = list(prefixes) if prefixes is not None else [None] * n
        if len(plist) != n or len(names) != n:
            raise ValueError(f"generate: {n} prompts, {len(plist)} params, {len(names)} prefixes")
        gens = [self.submit(p, sp, name) for p, sp, name in zip(prompts, plist, names, strict=True)]
        if self._thread is None:
            while not all(g.done for g in gens):
                self.step()
        return [g.wait() for g in gens]

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(waiting=len(self._waiting), running=len(self._running),
                               counters=dict(self._counters))

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def step(self) -> bool:
        """One round: drop cancelled requests, admit and prefill waiting ones, decode one token for
        every running row. Returns False when there was nothing to do. On an error every running
        request finishes with reason "error" and the error is raised."""
        if self.model.training:  # dropout would make rows depend on the batch
            self.model.eval()
        try:
            self._drop_cancelled()
            joined = self._admit()
            if self._running:
                self._decode()
            return bool(joined or self._running)
        except Exception as exc:
            rows, self._running, self._cache, self._mask = self._running, [], None, None
            for row in rows:
                if not row.gen.done:
                    self._counters["requests_error"] += 1
                    row.gen._finish("error", f"{type(exc).__name__}: {exc}")
            raise

    def start(self) -> None:
        """Run ``step`` in a background thread until ``stop``."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="prefixtune-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background thread and cancel every request still waiting or running."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            rows, self._waiting = [*self._waiting, *self._running], deque()
        self._running, self._cache, self._mask = [], None, None
        for row in rows:
            if not row.gen.done:
                row.gen._finish("cancelled")

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:
                logger.exception("engine step failed; its requests finished with an error")

    # ------------------------------------------------------------------ internals
    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [r for r in self._waiting if r.gen._cancel.is_set()]
            if cancelled:
                self._waiting = deque(r for r in self._waiting if not r.gen._cancel.is_set())
        for row in cancelled + [r for r in self._running if r.gen._cancel.is_set() and not r.gen.done]:
            self._finish(row, "cancelled")
        self._remove_finished()

    def _admit(self) -> list[_Row]:
        """Prefill up to ``max_prefill_batch`` waiting requests and merge them into the running batch."""
        with self._lock:
            room = min(self.config.max_batch_size - len(self._running), self.config.max_prefill_batch)
            joiners = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        if not joiners:
            return []
        cache, prefix_mask = cache_from_prefixes([r.kv for r in joiners], self.device, self.dtype)
        t = max(len(r.gen.prompt_ids) for r in joiners)
        ids = torch.full((len(joiners), t), self._pad_id, dtype=torch.long, device=self.device)
        token_mask = torch.zeros(len(joiners), t, dtype=torch.long, device=self.device)
        for i, row in enumerate(joiners):
            prompt = row.gen.prompt_ids
            ids[i, t - len(prompt):] = torch.tensor(prompt, device=self.device)
            token_mask[i, t - len(prompt):] = 1
            self._counters["prompt_tokens"] += len(prompt)
        mask = torch.cat([prefix_mask, token_mask], dim=1)  # (G, P_max + T)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]  # P_r + index among the row's tokens
        logits = self._forward(ids, mask, positions, cache)
        if self._cache is None:
            self._cache, self._mask = cache, mask
        else:
            self._cache = merge_caches(self._cache, cache)
            length = max(self._mask.shape[1], mask.shape[1])
            self._mask = torch.cat([_left_pad(self._mask, length), _left_pad(mask, length)], dim=0)
        self._running.extend(joiners)
        self._sample(joiners, logits)
        return joiners

    def _decode(self) -> None:
        """Feed every running row its pending token: one (B, 1) forward over the shared cache."""
        ids = torch.tensor([[r.pending] for r in self._running], dtype=torch.long, device=self.device)
        positions = self._mask.sum(-1, keepdim=True)  # (B, 1): real columns before the new token
        mask = torch.cat([self._mask, self._mask.new_ones(len(self._running), 1)], dim=1)
        logits = self._forward(ids, mask, positions, self._cache)
        self._mask = mask
        self._counters["steps"] += 1
        self._counters["decoded_rows"] += len(self._running)
        self._sample(self._running, logits)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: object) -> torch.Tensor:
        """ids, positions (B, T); mask (B, cached + T). Returns the last position's logits (B, V) float32."""
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Choose each row's next token (logits (len(rows), V)), emit it, finish rows that are done."""
        tokens = next_tokens(logits, [r.gen.params for r in rows], [r.generator for r in rows])
        for row, token in zip(rows, tokens, strict=True):
            row.pending = token
            row.gen._emit(token)
            self._counters["generated_tokens"] += 1
            params = row.gen.params
            if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
                self._finish(row, "stop")
            elif len(row.gen.tokens) >= params.max_new_tokens:
                self._finish(row, "length")
        self._remove_finished()

    def _finish(self, row: _Row, reason: FinishReason) -> None:
        self._counters[f"requests_{reason}"] += 1
        row.gen._finish(reason)

    def _remove_finished(self) -> None:
        """Take finished rows out of the batch, its cache and mask; drop columns left all padding."""
        keep = [i for i, r in enumerate(self._running) if not r.gen.done]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = self._mask[rows]
        drop = int((mask.sum(0) == 0).long().cumprod(0).sum())  # leading columns that are padding everywhere
        self._mask = mask[:, drop:]
        keep_cache_rows(self._cache, rows, drop)


def _left_pad(mask: torch.Tensor, length: int) -> torch.Tensor:
    """(B, L) → (B, length) with zeros in front."""
    return torch.nn.functional.pad(mask, (length - mask.shape[1], 0))
