"""`TrainingLoop` (setup / step / evaluate / save) and `fit()`: one readable training loop with evaluation,
best-checkpoint keeping and exact resume.

Works on any module whose forward(**batch) returns an output with ``.loss`` and whose trainable
parameters have ``requires_grad`` (a ``PrefixModel``, a PEFT model, or a fully fine-tuned model).
Resume state (trainable tensors, AdamW moments, RNG state, step counters; see ``state``) is written every
``checkpoint_every`` steps, at every evaluation and at the end, atomically. A run killed at any moment resumes
from the last committed step and ends with the same parameters as an uninterrupted run.

Under ``torchrun`` (several ranks, see ``distributed``) ``batch_size`` is per rank: each optimizer step
sees ``batch_size × ranks × grad_accum`` examples, drawn in the order one process with ``batch_size ×
ranks`` would draw them, and each rank computes its contiguous share of every global batch. A rank's
loss is its summed per-token loss divided by the token count of the whole global batch (known on every
rank, since every rank holds the data), so the gradients summed over ranks are those of one process.
Only rank 0 writes; the dev loss is computed by all ranks together and every rank takes the same
early-stopping decision. The resume state is global (optimizer steps and global batches consumed), so a
run resumes on another number of ranks as long as the global batch stays the same.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from prefixtune.errors import ConfigError, DataError, NonFiniteLossError
from prefixtune.tasks.encoding import EncodedExample, collate
from prefixtune.training import distributed
from prefixtune.training.config import TrainConfig
from prefixtune.training.state import FILES, TrainerState, apply_state, read_state, save_state, trainable, truncate_log

STATE_NAME = FILES.state
LOG_NAME = FILES.log


LENGTH_GROUP_BATCHES = 50  # batches per chunk that ``group_by_length`` sorts by length


def _batches_of_epoch(n: int, batch_size: int, seed: int, epoch: int,
                      lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Example indices of each batch of one epoch: a seeded shuffle cut into batches. With ``lengths`` (one
    per example; `TrainConfig.group_by_length`), each chunk of ``LENGTH_GROUP_BATCHES`` batches is sorted by
    length (longest first) before it is cut, and the batches are shuffled again; the same seed and epoch
    always give the same batches, so a resumed run sees what an uninterrupted one would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    chunk = batch_size * LENGTH_GROUP_BATCHES
    order = [i for c in range(0, n, chunk) for i in sorted(order[c : c + chunk], key=lambda i: -lengths[i])]
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _shifts_labels(model: nn.Module) -> bool:
    """Whether ``model``'s loss predicts ``labels[:, t + 1]`` at position t (a decoder-only LM)."""
    spec = getattr(model, "spec", None)  # a PrefixModel knows its architecture
    if spec is not None:
        return spec.kind == "causal"
    return type(model).__name__.endswith("ForCausalLM")


def _loss_units(labels: torch.Tensor, shifted: bool) -> int:
    """How many labels a model's mean loss averages over: target tokens of ``labels`` (B, T) (without the
    first column for a decoder-only LM, which has nothing to predict it from), or rows of class ids (B,)."""
    if shifted and labels.dim() == 2:
        labels = labels[:, 1:]
    return int((labels != -100).sum())


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[EncodedExample], batch_size: int, pad_id: int,
                  precision: str = "fp32", collate_fn: Callable[..., dict[str, torch.Tensor]] = collate) -> float:
    """Mean per-token loss over ``examples`` (target tokens only).

    With several ranks, batch i is computed by rank ``i % ranks`` and the token-weighted sums are added
    over ranks; every rank runs the same number of forward passes (a rank without a batch left reruns
    batch 0 and ignores it, as FSDP needs) and returns the same value.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    shifted = _shifts_labels(model)
    world, rank = distributed.world_size(), distributed.rank()
    starts = range(0, len(examples), batch_size)
    for r in range(math.ceil(len(starts) / world)):
        j = r * world + rank
        i = starts[j] if j < len(starts) else 0
        batch = {k: v.to(device) for k, v in collate_fn(list(examples[i : i + batch_size]), pad_id).items()}
        n = _loss_units(batch["labels"], shifted) if j < len(starts) else 0  # labelled tokens (or rows)
        with _autocast(precision, device):
            loss = model(**batch).loss
        if n:
            total += float(loss.detach()) * n
            count += n
    model.train(was_training)
    total, count = distributed.all_reduce_sum([total, count])  # every rank receives the same sums
    return total / max(count, 1)


def _accumulation_window(micro_step: int, per_epoch: int, grad_accum: int) -> list[tuple[int, int]]:
    """(epoch, batch index) of the global batches of the next optimizer step; an epoch boundary ends it."""
    window = []
    for k in range(grad_accum):
        epoch, index = divmod(micro_step + k, per_epoch)
        window.append((epoch, index))
        if index == per_epoch - 1:
            break
    return window


Collate = Callable[[list[Any], int], dict[str, torch.Tensor]]


@dataclass
class _Window:
    """Running sums of the log window (steps since the last log line)."""

    loss: float = 0.0
    tokens: int = 0
    start: float = 0.0


class TrainingLoop:
    """Train the trainable parameters of ``model`` on ``train``: ``setup`` (optimizer, schedule, resume),
    ``step`` (one optimizer step over a rank-sharded accumulation window), ``evaluate`` (dev loss, best
    prefix, early stopping), ``save`` (the resume state); ``run`` strings them together.

    Under ``torchrun`` every rank builds the loop with the same arguments (it joins the process group from
    the environment if the caller has not); only rank 0 writes files and calls ``save_best``; every rank
    ends with the same state. The trainable parameters start from rank 0's values.
    """

    def __init__(self, model: nn.Module, train: Sequence[Any], out_dir: str | Path, config: TrainConfig,
                 pad_id: int, dev: Sequence[Any] | None = None,
                 save_best: Callable[[Path], None] | None = None,
                 on_step: Callable[[TrainerState], None] | None = None, progress: bool = True,
                 collate_fn: Collate = collate) -> None:
        distributed.init_from_env()
        self.model, self.train, self.dev, self.config, self.pad_id = model, train, dev, config, pad_id
        self.out, self.save_best, self.on_step, self.progress = Path(out_dir), save_best, on_step, progress
        self.collate_fn = collate_fn
        self.main, self.world = distributed.is_main(), distributed.world_size()
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        if not train:
            raise DataError("no training examples")
        self.params = list(trainable(model).values())
        if not self.params:
            raise ConfigError("the model has no trainable parameters")
        self.device = self.params[0].device
        self.global_batch = config.batch_size * self.world
        self.total = config.total_steps(len(train), self.world)
        self.per_epoch = math.ceil(len(train) / self.global_batch)
        self.shifted = _shifts_labels(model)
        self.state = TrainerState()
        self._epoch_batches: dict[int, list[list[int]]] = {}
        self.last_good_loss: float | None = None
        self.saved_step = 0

    def setup(self, resume: bool) -> None:
        """Optimizer and schedule; the committed resume state of ``out_dir`` when ``resume`` finds one,
        else a fresh start (log removed, a step-0 state written as a resume target)."""
        config, out = self.config, self.out
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(config.warmup_steps, self.total))
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        if distributed.broadcast_object(resume and (out / STATE_NAME).is_file() if self.main else None):
            meta, tensors = distributed.broadcast_object(read_state(out) if self.main else None)
            self.state = apply_state(out, meta, tensors, self.model, self.opt, self.sched, config.batch_size,
                                     self.world)
            if self.main:
                truncate_log(out / LOG_NAME, self.state.step)  # steps after the checkpoint are replayed, logged again
        else:
            torch.manual_seed(config.seed)
            if self.main:
                (out / LOG_NAME).unlink(missing_ok=True)
                self.save()  # step 0: a resume target
        distributed.broadcast_parameters(self.params)
        self.saved_step = self.state.step

    def log(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if self.main:
            with open(self.out / LOG_NAME, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def _window_batches(self) -> list[tuple[int, int, list[int], dict[str, torch.Tensor], int]]:
        """Per global batch of the next step: (epoch, index, this rank's share, its batch, its labelled tokens)."""
        micro = []
        for epoch, index in _accumulation_window(self.state.micro_step, self.per_epoch, self.config.grad_accum):
            if epoch not in self._epoch_batches:
                lengths = [len(ex.input_ids) for ex in self.train] if self.config.group_by_length else None
                self._epoch_batches = {epoch: _batches_of_epoch(len(self.train), self.global_batch,
                                                                self.config.seed, epoch, lengths)}
            idx = self._epoch_batches[epoch][index]
            share = [idx[i] for i in distributed.shard_range(len(idx))]
            # a rank without a share of a short last batch reruns its first example with weight 0,
            # so that every rank runs the same forward/backward passes (FSDP gathers weights in them)
            batch = {k: v.to(self.device)
                     for k, v in self.collate_fn([self.train[i] for i in share or idx[:1]], self.pad_id).items()}
            micro.append((epoch, index, share, batch, _loss_units(batch["labels"], self.shifted) if share else 0))
        return micro

    def step(self) -> tuple[float, int]:
        """One optimizer step; returns its loss (per target token of the window) and its token count."""
        distributed.sync_rng()  # one random stream for all ranks (prefix dropout as one process draws it)
        micro = self._window_batches()
        global_units = distributed.all_reduce_sum([m[4] for m in micro])
        step_loss, tokens, bad = 0.0, 0, None
        window_units = max(sum(global_units), 1)
        for epoch, index, share, batch, units in micro:
            with _autocast(self.config.precision, self.device):
                out_ = self.model(**batch)
                # this rank's token sum over the token count of the whole window (all its global
                # batches, all ranks): the sum over ranks and micro-steps is the per-token mean of the
                # window, so batch b × accumulation k equals batch b·k even when batches hold different
                # numbers of target tokens, and a window cut short by an epoch's end is not scaled down
                loss = out_.loss * (units / window_units) if units else out_.logits.sum() * 0.0
            if bad is None and not torch.isfinite(loss):
                rank = f", rank {distributed.rank()}" if self.world > 1 else ""
                bad = f"non-finite loss ({float(loss.detach())}) at step {self.state.step + 1} " \
                      f"(epoch {epoch}, batch {index}{rank})"
            loss.backward()  # even when non-finite: the other ranks' passes wait for this one's
            step_loss += float(loss.detach())
            tokens += int(batch["attention_mask"].sum()) if share else 0
        step_loss, tokens, n_bad = distributed.all_reduce_sum([step_loss, tokens, bad is not None])
        if n_bad:
            raise NonFiniteLossError(
                f"{bad or f'non-finite loss at step {self.state.step + 1} on another rank'}; "
                f"last good loss {self.last_good_loss}; the last checkpoint (step {self.saved_step}) is kept"
            )
        self.state.micro_step += len(micro)
        distributed.sum_gradients(self.params)
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.state.step += 1
        self.last_good_loss = step_loss
        return step_loss, int(tokens)

    def evaluate(self) -> None:
        """Dev loss (all ranks together); keeps the best prefix in ``best/``; decides early stopping."""
        state, config = self.state, self.config
        dev_loss = evaluate_loss(self.model, self.dev, config.batch_size, self.pad_id, config.precision,
                                 self.collate_fn)
        self.log({"step": state.step, "dev_loss": dev_loss})
        if state.best_dev_loss is None or dev_loss < state.best_dev_loss:
            state.best_dev_loss, state.best_step = dev_loss, state.step
            state.evals_without_improvement = 0
            if self.save_best and self.main:
                self.save_best(self.out / FILES.best)
        else:
            state.evals_without_improvement += 1
            if config.early_stopping and state.evals_without_improvement >= config.early_stopping:
                state.stopped = (f"early stopping after {state.evals_without_improvement} evaluations "
                                 "without improvement")

    def save(self) -> None:
        """Write the resume state (rank 0 only)."""
        if self.main:
            save_state(self.out, self.model, self.opt, self.sched, self.state, self.global_batch, self.world)

    def _log_window(self, window: _Window) -> None:
        state, config = self.state, self.config
        elapsed = time.perf_counter() - window.start
        n = config.log_every if state.step % config.log_every == 0 else state.step % config.log_every
        self.log({"step": state.step, "epoch": round(state.micro_step / self.per_epoch, 4),
                  "loss": window.loss / n, "lr": self.sched.get_last_lr()[0],
                  "tokens_per_s": window.tokens / max(elapsed, 1e-9)})

    def run(self, resume: bool = False) -> TrainerState:
        """Train to ``total_steps`` (or early stopping); returns the final state."""
        self.setup(resume)
        state, config = self.state, self.config
        if state.stopped:
            return state
        bar = tqdm(total=self.total, initial=state.step, disable=not (self.progress and self.main), desc="train",
                   unit="step")
        self.model.train()
        window = _Window(start=time.perf_counter())
        try:
            while state.step < self.total:
                step_loss, tokens = self.step()
                window.loss += step_loss
                window.tokens += tokens
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}",
                                tok_s=f"{window.tokens / max(time.perf_counter() - window.start, 1e-9):.0f}")
                if state.step % config.log_every == 0 or state.step == self.total:
                    self._log_window(window)
                    window = _Window(start=time.perf_counter())
                evaluating = bool(self.dev and config.eval_every)
                if evaluating and (state.step % config.eval_every == 0 or state.step == self.total):
                    self.evaluate()
                if state.step % config.checkpoint_every == 0 or (evaluating and state.step % config.eval_every == 0):
                    self.save()
                    self.saved_step = state.step
                if self.on_step:
                    self.on_step(state)
                if state.stopped:
                    break
        finally:
            bar.close()
        if not state.stopped:
            state.stopped = "finished"
        if self.save_best and self.main and (not self.dev or not config.eval_every):
            self.save_best(self.out / FILES.best)
        self.save()
        distributed.barrier()  # the other ranks return once rank 0's files are written
        return state


def fit(
    model: nn.Module,
    train: Sequence[EncodedExample],
    out_dir: str | Path,
    config: TrainConfig,
    pad_id: int,
    dev: Sequence[EncodedExample] | None = None,
    resume: bool = False,
    save_best: Callable[[Path], None] | None = None,
    on_step: Callable[[TrainerState], None] | None = None,
    progress: bool = True,
    collate_fn: Collate = collate,
) -> TrainerState:
    """`TrainingLoop` ``(...).run(resume)``; returns the final state.

    Writes ``log.jsonl`` (one JSON line per log/eval), ``trainer_state.json`` + tensors (resume),
    and, through ``save_best(dir)``, the best model by dev loss to ``out_dir/best`` (or the
    last one when there is no dev set). ``on_step`` is called after every optimizer step.
    ``collate_fn(examples, pad_id)`` builds a batch (left-padded by default).
    """
    loop = TrainingLoop(model, train, out_dir, config, pad_id, dev=dev, save_best=save_best, on_step=on_step,
                        progress=progress, collate_fn=collate_fn)
    return loop.run(resume)
