"""fit(): one readable training loop with evaluation, best-checkpoint keeping and exact resume.

Works on any module whose forward(**batch) returns an output with ``.loss`` and whose trainable
parameters have ``requires_grad`` (a ``PrefixModel``, a PEFT model, or a fully fine-tuned model).
Resume state (trainable tensors, AdamW moments, RNG state, step counters) is written every
``checkpoint_every`` steps, at every evaluation and at the end, atomically:
tensors to ``state-<step>.safetensors``, then ``trainer_state.json`` naming that file and its
sha256 is renamed into place, which is the commit point. A run killed at any moment resumes
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from prefixtune.errors import NonFiniteLossError
from prefixtune.files import atomic_write, atomic_write_text, sha256_file
from prefixtune.tasks.data import EncodedExample, collate
from prefixtune.training import distributed

STATE_NAME = "trainer_state.json"
LOG_NAME = "log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings. ``batch_size`` is per rank; an optimizer step sees
    ``batch_size × ranks × grad_accum`` examples (``ranks`` = 1 without ``torchrun``)."""

    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    precision: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    eval_every: int | None = None
    early_stopping: int | None = None
    log_every: int = 10
    checkpoint_every: int = 20

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs > 0,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "weight_decay": self.weight_decay >= 0,
            "max_grad_norm": self.max_grad_norm > 0,
            "precision": self.precision in ("fp32", "bf16"),
            "max_steps": self.max_steps is None or self.max_steps >= 1,
            "eval_every": self.eval_every is None or self.eval_every >= 1,
            "early_stopping": self.early_stopping is None or self.early_stopping >= 1,
            "log_every": self.log_every >= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TrainConfig: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")

    def total_steps(self, num_examples: int, world_size: int = 1) -> int:
        """Optimizer steps for ``num_examples`` training examples on ``world_size`` ranks."""
        per_epoch = math.ceil(num_examples / (self.batch_size * world_size) / self.grad_accum)
        steps = math.ceil(per_epoch * self.epochs)
        return min(steps, self.max_steps) if self.max_steps else steps


@dataclass
class TrainerState:
    """Counters that, with the tensors, make a run resumable."""

    step: int = 0
    micro_step: int = 0  # global batches consumed since the start (over all epochs)
    best_dev_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _batches_of_epoch(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


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


def _save_state(out: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, state: TrainerState,
                global_batch: int, world_size: int) -> None:
    names = {id(p): n for n, p in _trainable(model).items()}
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in _trainable(model).items()}
    groups = opt.state_dict()["param_groups"]
    for p, st in opt.state.items():
        for key, value in st.items():
            tensors[f"optim.{names[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    name = f"state-{state.step}.safetensors"
    atomic_write(out / name, lambda tmp: save_file(tensors, str(tmp)))
    meta = {
        "trainer": asdict(state),
        "tensors": name,
        "tensors_sha256": sha256_file(out / name),
        "global_batch_size": global_batch,  # examples per accumulation micro-step, over all ranks
        "world_size": world_size,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
        "scheduler": sched.state_dict() if sched is not None else None,
    }
    atomic_write_text(out / STATE_NAME, json.dumps(meta, indent=2) + "\n")
    for old in out.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _read_state(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The committed resume state of ``out``: its JSON and its (checked) tensors."""
    meta_path = out / STATE_NAME
    meta = json.loads(meta_path.read_text())
    tensor_path = out / meta["tensors"]
    if sha256_file(tensor_path) != meta["tensors_sha256"]:
        raise ValueError(f"{tensor_path}: sha256 does not match {meta_path} field 'tensors_sha256'")
    return meta, load_file(str(tensor_path))


def _apply_state(out: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module,
                 opt: torch.optim.Optimizer, sched: Any, batch_size: int, world_size: int) -> TrainerState:
    """Load a state read by ``_read_state`` into the model, optimizer, scheduler and RNG."""
    saved_global = meta.get("global_batch_size", batch_size)  # states written before ranks existed: one process
    if saved_global != batch_size * world_size:
        hint = (f"pass --batch-size {saved_global // world_size} to resume on {world_size} rank(s)"
                if saved_global % world_size == 0 else f"use a number of ranks that divides {saved_global}")
        raise ValueError(f"{out / STATE_NAME}: saved with a global batch of {saved_global} examples (batch size "
                         f"per rank × {meta.get('world_size', 1)} rank(s)); now {batch_size} × {world_size} = "
                         f"{batch_size * world_size}; {hint}")
    tensor_path = out / meta["tensors"]
    params = _trainable(model)
    missing = [n for n in params if f"param.{n}" not in tensors]
    if missing:
        raise ValueError(f"{tensor_path}: no saved value for trainable parameter(s) {missing[:5]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    for p_name, p in params.items():
        st = {k.rsplit(".", 1)[1]: v.to(p.device) for k, v in tensors.items()
              if k.startswith(f"optim.{p_name}.") and k.count(".") == p_name.count(".") + 2}
        if st:
            opt.state[p] = st
    for group, saved in zip(opt.param_groups, meta["param_groups"], strict=True):
        group.update(saved)
    if sched is not None and meta["scheduler"] is not None:
        sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return TrainerState(**meta["trainer"])


def _truncate_log(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _accumulation_window(micro_step: int, per_epoch: int, grad_accum: int) -> list[tuple[int, int]]:
    """(epoch, batch index) of the global batches of the next optimizer step; an epoch boundary ends it."""
    window = []
    for k in range(grad_accum):
        epoch, index = divmod(micro_step + k, per_epoch)
        window.append((epoch, index))
        if index == per_epoch - 1:
            break
    return window


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
    collate_fn: Callable[[list[EncodedExample], int], dict[str, torch.Tensor]] = collate,
) -> TrainerState:
    """Train the trainable parameters of ``model`` on ``train``; returns the final state.

    Writes ``log.jsonl`` (one JSON line per log/eval), ``trainer_state.json`` + tensors (resume),
    and, through ``save_best(dir)``, the best model by dev loss to ``out_dir/best`` (or the
    last one when there is no dev set). ``on_step`` is called after every optimizer step.
    ``collate_fn(examples, pad_id)`` builds a batch (left-padded by default).

    Under ``torchrun`` every rank calls ``fit`` with the same arguments (it joins the process group from
    the environment if the caller has not); only rank 0 writes files and calls ``save_best``; every rank
    returns the same state. The trainable parameters start from rank 0's values.
    """
    distributed.init_from_env()
    main, world = distributed.is_main(), distributed.world_size()
    out = Path(out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    if not train:
        raise ValueError("no training examples")
    params = list(_trainable(model).values())
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = params[0].device
    global_batch = config.batch_size * world
    total = config.total_steps(len(train), world)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.warmup_steps, total))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    state = TrainerState()
    if distributed.broadcast_object(resume and (out / STATE_NAME).is_file() if main else None):
        meta, tensors = distributed.broadcast_object(_read_state(out) if main else None)
        state = _apply_state(out, meta, tensors, model, opt, sched, config.batch_size, world)
        if main:
            _truncate_log(out / LOG_NAME, state.step)  # steps after the checkpoint are replayed and logged again
    else:
        torch.manual_seed(config.seed)
        if main:
            (out / LOG_NAME).unlink(missing_ok=True)
            _save_state(out, model, opt, sched, state, global_batch, world)  # step 0: a resume target
    distributed.broadcast_parameters(params)
    if state.stopped:
        return state

    def log(record: dict[str, Any]) -> None:
        state.history.append(record)
        if main:
            with open(out / LOG_NAME, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    per_epoch = math.ceil(len(train) / global_batch)
    epoch_batches: dict[int, list[list[int]]] = {}
    shifted = _shifts_labels(model)
    bar = tqdm(total=total, initial=state.step, disable=not (progress and main), desc="train", unit="step")
    model.train()
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    last_good_loss = None
    saved_step = state.step
    try:
        while state.step < total:
            distributed.sync_rng()  # one random stream for all ranks (prefix dropout as one process draws it)
            micro = []  # per global batch: this rank's share (or None), its collated batch, its labelled tokens
            for epoch, index in _accumulation_window(state.micro_step, per_epoch, config.grad_accum):
                if epoch not in epoch_batches:
                    epoch_batches = {epoch: _batches_of_epoch(len(train), global_batch, config.seed, epoch)}
                idx = epoch_batches[epoch][index]
                share = [idx[i] for i in distributed.shard_range(len(idx))]
                # a rank without a share of a short last batch reruns its first example with weight 0,
                # so that every rank runs the same forward/backward passes (FSDP gathers weights in them)
                batch = {k: v.to(device) for k, v in collate_fn([train[i] for i in share or idx[:1]], pad_id).items()}
                micro.append((epoch, index, share, batch, _loss_units(batch["labels"], shifted) if share else 0))
            global_units = distributed.all_reduce_sum([m[4] for m in micro])
            step_loss, tokens, bad = 0.0, 0, None
            window_units = max(sum(global_units), 1)
            for epoch, index, share, batch, units in micro:
                with _autocast(config.precision, device):
                    out_ = model(**batch)
                    # this rank's token sum over the token count of the whole window (all its global
                    # batches, all ranks): the sum over ranks and micro-steps is the per-token mean of the
                    # window, so batch b × accumulation k equals batch b·k even when batches hold different
                    # numbers of target tokens, and a window cut short by an epoch's end is not scaled down
                    loss = out_.loss * (units / window_units) if units else out_.logits.sum() * 0.0
                if bad is None and not torch.isfinite(loss):
                    bad = (f"non-finite loss ({float(loss.detach())}) at step {state.step + 1} "
                           f"(epoch {epoch}, batch {index}{f', rank {distributed.rank()}' if world > 1 else ''})")
                loss.backward()  # even when non-finite: the other ranks' passes wait for this one's
                step_loss += float(loss.detach())
                tokens += int(batch["attention_mask"].sum()) if share else 0
            step_loss, tokens, n_bad = distributed.all_reduce_sum([step_loss, tokens, bad is not None])
            if n_bad:
                raise NonFiniteLossError(
                    f"{bad or f'non-finite loss at step {state.step + 1} on another rank'}; "
                    f"last good loss {last_good_loss}; the last checkpoint (step {saved_step}) is kept"
                )
            state.micro_step += len(micro)
            distributed.sum_gradients(params)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            last_good_loss = step_loss
            window_loss += step_loss
            window_tokens += int(tokens)
            bar.update(1)
            elapsed = time.perf_counter() - window_start
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{window_tokens / max(elapsed, 1e-9):.0f}")
            if state.step % config.log_every == 0 or state.step == total:
                n = config.log_every if state.step % config.log_every == 0 else state.step % config.log_every
                log({"step": state.step, "epoch": round(state.micro_step / per_epoch, 4),
                     "loss": window_loss / n, "lr": sched.get_last_lr()[0],
                     "tokens_per_s": window_tokens / max(elapsed, 1e-9)})
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            if dev and config.eval_every and (state.step % config.eval_every == 0 or state.step == total):
                dev_loss = evaluate_loss(model, dev, config.batch_size, pad_id, config.precision, collate_fn)
                log({"step": state.step, "dev_loss": dev_loss})
                if state.best_dev_loss is None or dev_loss < state.best_dev_loss:
                    state.best_dev_loss, state.best_step = dev_loss, state.step
                    state.evals_without_improvement = 0
                    if save_best and main:
                        save_best(out / "best")
                else:
                    state.evals_without_improvement += 1
                    if config.early_stopping and state.evals_without_improvement >= config.early_stopping:
                        state.stopped = (f"early stopping after {state.evals_without_improvement} "
                                         "evaluations without improvement")
            evaluated = bool(dev and config.eval_every and state.step % config.eval_every == 0)
            if state.step % config.checkpoint_every == 0 or evaluated:
                if main:
                    _save_state(out, model, opt, sched, state, global_batch, world)
                saved_step = state.step
            if on_step:
                on_step(state)
            if state.stopped:
                break
    finally:
        bar.close()
    if not state.stopped:
        state.stopped = "finished"
    if main:
        if save_best and (not dev or not config.eval_every):
            save_best(out / "best")
        _save_state(out, model, opt, sched, state, global_batch, world)
    distributed.barrier()  # the other ranks return once rank 0's files are written
    return state
