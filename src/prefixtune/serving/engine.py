"""Batched multi-prefix generation over token ids: many prefixes, one frozen model.

The engine knows nothing about tokenization or HTTP: token ids in, token ids out. It wires four
parts (nano-vllm's split): a ``PrefixRegistry`` (validated prefixes, stored once), a ``Scheduler``
(waiting / running requests, admission; no tensors), ``RunningBatch`` objects (rows with the KV cache
and mask they share), and sampling. ``step()`` = schedule → run the model (prefill the joiners,
decode every batch) → postprocess (sample, emit, finish, drop finished rows).

How a mixed batch runs. A prefix is exactly a KV cache of P past tokens (the core's equivalence,
``tests/core/test_model.py``), so each row's prefix is placed in its batch's ``DynamicCache`` as P past
positions, in front of the row's own tokens. One cache holds every row of a batch, left-padded to a
common length; a (B, L) mask marks each row's real columns (its prefix and its tokens), and each new
token's position is the count of real columns before it (P_r + tokens so far), exactly where
``PrefixModel.generate`` puts it. A row therefore attends only to its own prefix and its own tokens.
Joining requests are prefilled together and merged into the running batch; the cache layout lives in
``core/cache.py``. By default they are packed (``prefill="packed"``): their prompts concatenated into one
row, each request's positions restarting at its P_r, and an attention that keeps each request to its own
prefix and its own tokens (causal), so that a prefill costs the sum of its prompts' lengths; each
request's K/V is then laid out as a row of the batch. Packing is used where it is exact, which the engine
checks once at construction (``packing_refused`` says why not): the model must run transformers' ``sdpa``
attention (through the attention interface) and take explicit position ids, as RoPE and learned
absolute positions do. Elsewhere (eager-only models, position biases built from the attention mask, a
model whose packed logits differ from its own), and with ``prefill="grouped"``, joiners are prefilled in
groups of similar length, left-padded (``max_prefill_padding``), their prefixes right-aligned.
A prompt longer than ``prefill_chunk`` tokens is prefilled in chunks over several steps, in a one-row
cache of its own, and joins its batch when its prompt is complete: the rows already running get a token
at every step meanwhile (chunked prefill, as vLLM and Sarathi do), so one long prompt never stalls them
for its whole prefill.

The GPU layout. On a GPU a small model's decode step is bound by kernel launches, not by arithmetic;
CUDA graphs remove the launches but replay fixed shapes at fixed addresses. ``kv_cache="static"`` gives
the decode step exactly that: a ``SlotCache`` of (slots, capacity) per layer, sizes in powers of two, each
row left-aligned in its slot with its own write column (a scatter, not a Python integer), and a 4-D
additive mask over the whole capacity; joins copy rows into free slots, leaves free them. With
``compile_decode="reduce-overhead"`` a run compiles one graph per (slots, capacity) bucket (tested on the
CPU: two graphs for a run of continuous joins, none new when it repeats). On the CPU the static layout
attends over its whole capacity and is no faster than "preallocated".

What is promised. Greedy rows give exactly the tokens of ``PrefixModel.generate`` alone (the tests
check it over continuous joins, cancellations and mixed prefix lengths). A request with a ``seed`` is
prefilled and decoded in a batch of its own (one more forward per step for each such row), so its
logits, and with its own generator its tokens, are the same whatever else runs: the same prompt,
prefix, parameters and seed give the same tokens alone or under any load, on the same machine and
build. Sampled requests without a seed share the batch (their tokens are random anyway).

Failures stay where they happen: a row whose sampling fails finishes with reason "error" alone; a
failing forward fails the rows of that batch only.

Sliding-window models (``config.sliding_window`` set): served only for requests whose whole context
(prefix + prompt + max_new_tokens) fits in the window, where sliding-window attention equals full
attention. A packed prefill lays each row out with no padding inside its columns (the window counts
cache columns), so such requests are packed like any others; without packing they are prefilled one at a
time. Longer requests are refused at submit.

Size: ~480 lines: the wiring of the five parts plus the submit-time checks, the prefill orchestration
(packed, grouped, chunked) and the engine thread; the parts themselves live in registry.py, scheduler.py,
batch.py, runner.py (the model's forwards and the checks of the fast paths) and sampling.py.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from prefixtune.core.cache import LAYOUTS, Layout, cache_from_prefixes, packing_refused_now
from prefixtune.core.model import PrefixModel
from prefixtune.core.spec import cache_mismatch, read_spec
from prefixtune.errors import QueueFullError, UnknownPrefixError
from prefixtune.serving.batch import ChunkedPrefill, RunningBatch, Sequence, StaticBatch
from prefixtune.serving.generation import EventCallback, FinishReason, Generation
from prefixtune.serving.registry import PrefixRegistry
from prefixtune.serving.runner import ModelRunner
from prefixtune.serving.sampling import SamplingParams, make_generator, sample_row
from prefixtune.serving.scheduler import Scheduler

__all__ = ["Engine", "EngineConfig", "EngineStats", "QueueFullError", "UnknownPrefixError"]

logger = logging.getLogger(__name__)

COUNTERS = ("requests_submitted", "requests_rejected", "requests_stop", "requests_length", "requests_cancelled",
            "requests_error", "prompt_tokens", "generated_tokens", "steps", "decoded_rows")
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]
PrefillMode = Literal["packed", "grouped"]
PREFILL_MODES: tuple[str, ...] = ("packed", "grouped")
COMPILE_MODES: tuple[str, ...] = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Bounds of the engine.

    Attributes:
        max_batch_size: most requests decoded together (rows of the running batches).
        max_waiting: most requests waiting to join; ``submit`` raises ``QueueFullError`` beyond it.
        max_prefill_batch: most waiting requests prefilled together when they join.
        max_context: most positions per request (prefix + prompt + new tokens); None: the model's
            ``max_position_embeddings``.
        max_resident_prefixes: most prefixes kept on the engine's device; the least recently used
            beyond it go to CPU memory (or, on a CPU engine, back to their folder). None: all resident.
        prefill: "packed": the joiners of a step (seeded ones aside) are prefilled as one packed row, where
            the model passes the packing check (``Engine.packing_refused``); "grouped", or where it does
            not: in groups of similar prompt length, as ``max_prefill_padding`` describes.
        prefill_chunk: a prompt longer than this many tokens is prefilled in chunks of at most this many
            tokens, one step's budget of chunks at a time (oldest request first), while the running rows
            go on decoding: a long prompt delays their next token by one chunk's prefill, not by its whole
            prefill, and short prompts that join meanwhile are prefilled at once. None: every prompt in
            one forward.
        max_prefill_padding: without packing, joiners are prefilled in groups of similar prompt length, each left-padded
            to its longest prompt, with at most this much padding per real prompt token (0.05: a prefill
            costs at most 5 percent more than the sum of its prompts' lengths); a larger value joins more
            requests per forward.
        kv_cache: the cache layout (``core/cache.py``): "preallocated" writes each new token's K/V in
            place, joining rows into free rows and leaving ones by moving the last row into their place;
            "dynamic" is transformers' ``DynamicCache`` (a copy of the whole cache per step, per join and
            per leave); "static" decodes in fixed shapes (slots and columns in powers of two, each row
            at its own write column, attending over the whole capacity), the layout for
            ``compile_decode="reduce-overhead"`` (CUDA graphs) on a GPU, where a step is launch-bound.
            All give the same tokens; at long contexts the per-step copy is as costly as the attention
            itself (``benchmarks/serve_decode.py``), hence "preallocated" by default. A model that the
            static layout would not serve exactly (checked at construction: ``Engine.static_refused``)
            gets "preallocated".
        compile_decode: "off", or a ``torch.compile`` mode ("default", "reduce-overhead" for CUDA
            graphs on a GPU, "max-autotune") for the decode step's forward, compiled on its first use:
            with static shapes under ``kv_cache="static"`` (one graph per (slots, capacity) bucket),
            with dynamic shapes otherwise (batch size and cache length change from step to step).
    """

    max_batch_size: int = 32
    max_waiting: int = 256
    max_prefill_batch: int = 8
    max_context: int | None = None
    max_resident_prefixes: int | None = None
    max_prefill_padding: float = 0.05
    prefill: PrefillMode = "packed"
    prefill_chunk: int | None = 512
    kv_cache: Layout = "preallocated"
    compile_decode: CompileMode = "off"

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_waiting", "max_prefill_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.max_context is not None and (not isinstance(self.max_context, int) or self.max_context < 2):
            raise ValueError(f"max_context must be None or an integer >= 2, got {self.max_context!r}")
        if self.prefill_chunk is not None and (isinstance(self.prefill_chunk, bool)
                                               or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 1):
            raise ValueError(f"prefill_chunk must be None or an integer >= 1, got {self.prefill_chunk!r}")
        if self.max_resident_prefixes is not None and (isinstance(self.max_resident_prefixes, bool) or not
                                                       isinstance(self.max_resident_prefixes, int)
                                                       or self.max_resident_prefixes < 1):
            raise ValueError(f"max_resident_prefixes must be None or an integer >= 1, "
                             f"got {self.max_resident_prefixes!r}")
        if isinstance(self.max_prefill_padding, bool) or not isinstance(self.max_prefill_padding, int | float) \
                or not self.max_prefill_padding >= 0:
            raise ValueError(f"max_prefill_padding must be a number >= 0, got {self.max_prefill_padding!r}")
        if self.kv_cache not in LAYOUTS:
            raise ValueError(f"kv_cache must be one of {LAYOUTS}, got {self.kv_cache!r}")
        if self.prefill not in PREFILL_MODES:
            raise ValueError(f"prefill must be one of {PREFILL_MODES}, got {self.prefill!r}")
        if self.compile_decode not in COMPILE_MODES:
            raise ValueError(f"compile_decode must be one of {COMPILE_MODES}, got {self.compile_decode!r}")


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot for monitoring: queue depth, batch size, request and token counters."""

    waiting: int
    running: int
    counters: dict[str, int]


def sliding_window_of(model: nn.Module) -> int | None:
    """The model's attention window (None: full attention); ValueError if it cannot be served exactly."""
    window = getattr(model.config, "sliding_window", None)
    layer_types = getattr(model.config, "layer_types", None) or ()
    if getattr(model.config, "use_sliding_window", None) is False or (
            layer_types and not any("sliding" in str(t) for t in layer_types)):
        return None  # a size the model does not use (Qwen2-MoE: use_sliding_window=False, full attention layers)
    if window is None and any("sliding" in str(t) for t in layer_types):
        raise ValueError(f"{type(model).__name__} has sliding-window layers but no sliding_window size")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{type(model).__name__}: config.sliding_window = {window!r} is not a window size")
    return window


class Engine:
    """One frozen decoder-only model serving any number of named prefixes with continuous batching.

    ``submit`` (any thread) queues a request and returns its ``Generation``; ``step`` runs one
    round (schedule, prefill, decode, sample); ``start`` runs rounds in a background thread.
    ``generate`` is the synchronous convenience for lists of requests.
    """

    def __init__(self, model: nn.Module, config: EngineConfig | None = None,
                 eos_token_ids: Seq[int] | None = None) -> None:
        self.spec = read_spec(model)
        if self.spec.kind != "causal":
            raise ValueError(f"the engine serves decoder-only models; {self.spec.architecture} is {self.spec.kind}")
        if "past_key_values" not in inspect.signature(model.forward).parameters:
            raise ValueError(f"the engine decodes from a KV cache, and {self.spec.architecture} keeps none (its "
                             "forward takes no past_key_values); generate with PrefixModel.generate instead")
        mismatch = cache_mismatch(model)  # the engine writes each request's prefix into the model's own cache
        if mismatch is not None:
            raise ValueError(f"the engine serves from the model's KV cache, and {mismatch}; generate with "
                             "PrefixModel.generate instead")
        self.window = sliding_window_of(model)
        self.model = model.eval()
        self.config = config or EngineConfig()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if eos_token_ids is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        #: each request in a batch of its own: a cache-route model that numbers positions by cache column and
        #: takes no position ids (RoFormer, MPT, BART's decoder, TrOCR) would shift a row's positions whenever
        #: the rows around it change the batch's length
        self.rows_alone = (self.spec.route == "cache" and not self.spec.cache_position_ids
                           and self.spec.position_padding_idx is None and not self.spec.left_padding_exact)
        self.max_context = self.config.max_context or getattr(model.config, "max_position_embeddings", None) or 2**31
        self.runner = ModelRunner(model, self.device, self.dtype, self.config.kv_cache, self.config.compile_decode,
                                  position_padding_idx=self.spec.position_padding_idx,
                                  stack=self.spec.stack("decoder"))
        self.prefixes = PrefixRegistry(model, self.spec, self.device, self.dtype, self.max_context - 1,
                                       self.config.max_resident_prefixes)
        #: why each request runs in a batch of its own (None: rows share batches); checked once, on this model
        self.batching_refused: str | None = (
            "positions counted by cache column" if self.rows_alone
            else self.runner.batching_refused(self.prefixes.position_shape, self.spec.vocab_size))
        if self.batching_refused is not None and not self.rows_alone:
            logger.info("engine: each request in a batch of its own: %s", self.batching_refused)
            self.rows_alone = True
        #: why joiners are not packed (None: they are); checked once, on this model
        self.packing_refused: str | None = ("prefill='grouped'" if self.config.prefill == "grouped"
                                            else self.runner.packing_refused(self.prefixes.position_shape,
                                                                             self.spec.vocab_size))
        if self.packing_refused is not None and self.config.prefill == "packed":
            logger.info("engine: prefill not packed: %s", self.packing_refused)
        self.scheduler = Scheduler(self.config.max_batch_size, self.config.max_waiting,
                                   1 if self.window is not None and self.packing_refused is not None
                                   else self.config.max_prefill_batch)
        #: why the static layout is not used (None: it is, or it was not asked for); checked once
        self.static_refused: str | None = (self.runner.static_refused(self.prefixes.position_shape,
                                                                      self.spec.vocab_size)
                                           if self.config.kv_cache == "static" else None)
        if self.static_refused is not None:
            logger.info("engine: kv_cache 'static' not used: %s", self.static_refused)
        self.layout = "preallocated" if self.static_refused is not None else self.config.kv_cache
        self.runner.static_decode = self.layout == "static"
        self._shared = self._new_batch()  # every row that may share a batch
        self._solo: list[RunningBatch | StaticBatch] = []  # one batch per seeded row (or per row: rows_alone)
        self._chunked: list[ChunkedPrefill] = []  # long prompts being prefilled, oldest first
        # every key exists from the start, so that stats() can copy the dict while the loop counts
        self._counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self._count_lock = threading.Lock()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------------ prefixes
    def add_prefix(self, name: str, source: PrefixModel | str | Path | torch.Tensor) -> int:
        """Register (or replace) prefix ``name``; returns its length P.

        source: a ``PrefixModel`` on this engine's base model, a ``save_pretrained`` folder (checked
        completely before it is read: ``ConfigError`` naming the folder), or the K/V tensor
        (P, layers, 2, kv_heads, head_dim).
        """
        return self.prefixes.add(name, source)

    def remove_prefix(self, name: str) -> None:
        """Unregister ``name``; requests already submitted keep using it."""
        self.prefixes.remove(name)

    def prefix_length(self, name: str | None) -> int:
        """P of prefix ``name`` (0 for None, the base model); UnknownPrefixError if not registered."""
        return 0 if name is None else self.prefixes.length(name)

    def prefix_names(self) -> list[str]:
        return self.prefixes.names()

    # ------------------------------------------------------------------ requests
    def submit(self, prompt_ids: Seq[int], params: SamplingParams | None = None, prefix: str | None = None,
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
        try:
            kv = None if prefix is None else self.prefixes.get(prefix)
        except UnknownPrefixError:
            raise UnknownPrefixError(f"request {rid}: unknown prefix {prefix!r}; "
                                     f"registered: {self.prefixes.names()[:20]}") from None
        p = 0 if kv is None else kv.shape[0]
        total = p + len(ids) + params.max_new_tokens
        for limit, what in ((self.max_context, "the context"), (self.window, "the sliding window")):
            if limit is not None and total > limit:
                raise ValueError(f"request {rid}: prefix + prompt_ids ({total - params.max_new_tokens}) + "
                                 f"max_new_tokens ({params.max_new_tokens}) = {total} exceeds {what} of "
                                 f"{limit} positions")
        gen = Generation(rid, ids, params, prefix, on_event)
        seq = Sequence(gen, p, kv, make_generator(params, self.device),
                       solo=self.rows_alone or (params.seed is not None and not params.greedy))
        try:
            self.scheduler.add(seq)
        except QueueFullError:
            self._count("requests_rejected")
            raise
        self._count("requests_submitted")
        return gen

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 prefixes: Seq[str | None] | None = None) -> list[list[int]]:
        """Run a list of requests to the end (in this thread, or waiting on the running engine thread)."""
        n = len(prompts)
        plist = list(params) if isinstance(params, Seq) else [params or SamplingParams()] * n
        names = list(prefixes) if prefixes is not None else [None] * n
        if len(plist) != n or len(names) != n:
            raise ValueError(f"generate: {n} prompts, {len(plist)} params, {len(names)} prefixes")
        gens = [self.submit(p, sp, name) for p, sp, name in zip(prompts, plist, names, strict=True)]
        if self._thread is None:
            while not all(g.done for g in gens):
                self.step()
        return [g.wait() for g in gens]

    def stats(self) -> EngineStats:
        waiting, running = self.scheduler.counts()
        with self._count_lock:
            counters = dict(self._counters)
        return EngineStats(waiting=waiting, running=running, counters=counters)

    # ------------------------------------------------------------------ the loop
    @torch.no_grad()
    def step(self) -> bool:
        """One round: drop cancelled requests, prefill the joiners and the next chunks of long prompts,
        decode one token for every running row, sample. Returns False when there was nothing to do.
        A failing forward finishes the rows of its batch with reason "error" (logged), never the others'."""
        if self.model.training:  # dropout would make rows depend on the batch
            self.model.eval()
        for seq in self.scheduler.cancelled():
            self._finish(seq, "cancelled")
        self._cleanup()
        joiners = self.scheduler.schedule()
        if joiners:
            self._prefill(joiners)
        if self._chunked:
            self._advance_chunks()
        self._cleanup()  # a request may end on its first token
        for batch in self._batches():
            self._guarded(batch.rows, lambda b=batch: self._decode(b))
        self._cleanup()
        return bool(joiners) or not self.scheduler.idle()

    def start(self) -> None:
        """Run ``step`` in a background thread until ``stop``."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="prefixtune-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the background thread and cancel every request still waiting or running."""
        with self.scheduler.wake:
            self._stopping = True
            self.scheduler.wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._shared.clear()
        self._solo = []
        self._chunked = []
        for seq in self.scheduler.drain():
            if not seq.gen.done:
                seq.gen._finish("cancelled")

    def _loop(self) -> None:
        while True:
            with self.scheduler.wake:
                while not self._stopping and not self.scheduler.waiting and not self.scheduler.running:
                    self.scheduler.wake.wait(timeout=1.0)
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # step() contains its failures; this is the last guard of the thread
                logger.exception("engine step failed")

    # ------------------------------------------------------------------ internals
    def _new_batch(self) -> RunningBatch | StaticBatch:
        return StaticBatch(self.dtype) if self.layout == "static" else RunningBatch()

    def _batches(self) -> list[RunningBatch | StaticBatch]:
        return [b for b in (self._shared, *self._solo) if len(b)]

    def _guarded(self, rows: list[Sequence], run: object) -> None:
        """Run ``run()``; if it raises, finish ``rows`` with reason "error" and take them out."""
        try:
            run()  # type: ignore[operator]
        except Exception as exc:
            logger.exception("engine: a forward failed; its %d requests finish with an error", len(rows))
            for seq in rows:
                if not seq.gen.done:
                    self._count("requests_error")
                    seq.gen._finish("error", f"{type(exc).__name__}: {exc}")

    def _prefill(self, joiners: list[Sequence]) -> None:
        """Prefill the joiners (seeded ones alone; one at a time on a sliding-window model) and add
        them to their batches; prompts longer than ``prefill_chunk`` start a chunked prefill instead."""
        chunk = self.config.prefill_chunk
        for seq in joiners:
            if chunk is not None and len(seq.gen.prompt_ids) > chunk:
                cache, mask = cache_from_prefixes([seq.kv], self.device, self.dtype, self.config.kv_cache,
                                                  self.runner.stack)
                self._chunked.append(ChunkedPrefill(seq, cache, mask))  # its first chunk runs in this step
        joiners = [s for s in joiners if chunk is None or len(s.gen.prompt_ids) <= chunk]
        shared = [s for s in joiners if not s.solo]
        groups = [[s] for s in joiners if s.solo]
        packed = self.packing_refused is None and packing_refused_now(self.model) is None  # not while attached
        if packed:
            groups += [shared] if shared else []
        else:
            groups += [[s] for s in shared] if self.window is not None else self._length_groups(shared)
        for group in groups:
            solo = group[0].solo
            target = self._new_batch() if solo else self._shared
            run = self._prefill_packed if packed and len(group) > 1 else self._prefill_group
            self._guarded(group, lambda g=group, t=target, f=run: f(g, t))
            if solo and len(target):
                self._solo.append(target)

    def _advance_chunks(self) -> None:
        """Prefill up to ``prefill_chunk`` tokens of the chunked prompts, oldest first; a request whose
        prompt is complete samples its first token and joins its batch."""
        budget = self.config.prefill_chunk or 0
        for part in list(self._chunked):
            if budget <= 0:
                break
            n = min(part.remaining, budget)
            budget -= n
            self._guarded([part.seq], lambda p=part, k=n: self._prefill_chunk(p, k))

    def _prefill_chunk(self, part: ChunkedPrefill, n: int) -> None:
        """One (1, n) forward of ``part``'s next prompt tokens over its own cache."""
        ids, positions, mask = part.chunk_inputs(n)
        logits = self.runner.forward(ids, mask, positions, part.cache)
        part.prefilled(mask, n)
        self._count("prompt_tokens", n)
        if part.remaining:
            return
        self._chunked.remove(part)
        target = self._new_batch() if part.seq.solo else self._shared
        target.join([part.seq], part.cache, part.mask)
        if part.seq.solo:
            self._solo.append(target)
        self._sample([part.seq], logits)

    def _length_groups(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """``seqs`` in groups of similar prompt length: shortest first, a group grows while its padding
        (rows × longest prompt - its tokens) stays within ``max_prefill_padding`` of its tokens."""
        groups: list[list[Sequence]] = []
        tokens = 0  # real prompt tokens of the last group
        for seq in sorted(seqs, key=lambda s: len(s.gen.prompt_ids)):
            n = len(seq.gen.prompt_ids)  # the longest so far (sorted)
            if groups and (len(groups[-1]) + 1) * n - (tokens + n) <= self.config.max_prefill_padding * (tokens + n):
                groups[-1].append(seq)
                tokens += n
            else:
                groups.append([seq])
                tokens = n
        return groups

    def _prefill_group(self, group: list[Sequence], batch: RunningBatch | StaticBatch) -> None:
        logits, cache, mask = self.runner.group_prefill([s.kv for s in group], [s.gen.prompt_ids for s in group])
        self._count("prompt_tokens", sum(len(s.gen.prompt_ids) for s in group))
        batch.join(group, cache, mask)
        self._sample(group, logits)

    def _prefill_packed(self, group: list[Sequence], batch: RunningBatch | StaticBatch) -> None:
        """Prefill ``group`` as one packed row (``ModelRunner.packed_prefill``), then one row each."""
        logits, cache, mask = self.runner.packed_prefill([s.kv for s in group], [s.gen.prompt_ids for s in group])
        self._count("prompt_tokens", sum(len(s.gen.prompt_ids) for s in group))
        batch.join(group, cache, mask)
        self._sample(group, logits)

    def _decode(self, batch: RunningBatch | StaticBatch) -> None:
        """Feed every row of ``batch`` its pending token: one (B, 1) forward over its cache."""
        ids, positions, mask = batch.decode_inputs()
        logits = batch.select(self.runner.forward(ids, mask, positions, batch.cache, decode=True))
        batch.decoded(mask)
        self._count("steps")
        self._count("decoded_rows", len(batch))
        self._sample(batch.rows, logits)

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        """Choose each row's next token (logits (len(rows), V)), emit it, finish rows that are done.
        A row whose sampling fails finishes with reason "error"; its neighbours go on."""
        greedy = logits.argmax(-1).tolist()
        for r, seq in enumerate(rows):
            params = seq.gen.params
            try:
                token = greedy[r] if params.greedy else sample_row(logits[r], params, seq.generator)
            except Exception as exc:
                logger.warning("request %s: sampling failed: %s", seq.gen.request_id, exc)
                self._count("requests_error")
                seq.gen._finish("error", f"sampling failed: {type(exc).__name__}: {exc}")
                continue
            seq.pending = token
            seq.gen._emit(token)
            self._count("generated_tokens")
            if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
                self._finish(seq, "stop")
            elif len(seq.gen.tokens) >= params.max_new_tokens:
                self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if reason == "cancelled" and seq.gen._cancel_reason == "stop":
            reason = "stop"  # the client found a stop string: a normal end, not a cancellation
        self._count(f"requests_{reason}")
        seq.gen._finish(reason)

    def _cleanup(self) -> None:
        """Take finished rows out of their batches and the scheduler; forget empty solo batches."""
        for batch in self._batches():
            batch.drop_finished()
        self._solo = [b for b in self._solo if len(b)]
        self._chunked = [c for c in self._chunked if not c.seq.gen.done]
        self.scheduler.release()

    def _count(self, key: str, n: int = 1) -> None:
        with self._count_lock:
            self._counters[key] += n
