"""fit(): one readable training loop with evaluation, best-checkpoint keeping and exact resume.

Works on any module whose forward(**batch) returns an output with ``.loss`` and whose trainable
parameters have ``requires_grad`` (a ``PrefixModel``, a PEFT model, or a fully fine-tuned model).
Resume state (trainable tensors, AdamW moments, RNG state, step counters) is written every
``checkpoint_every`` steps, at every evaluation and at the end, atomically:
tensors to ``state-<step>.safetensors``, then ``trainer_state.json`` naming that file and its
sha256 is renamed into place, which is the commit point. A run killed at any moment resumes
from the last committed step and ends with the same parameters as an uninterrupted run.
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

from .data import EncodedExample, collate
from .fileio import atomic_write, atomic_write_text, sha256_file

STATE_NAME = "trainer_state.json"
LOG_NAME = "log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings. The effective batch is ``batch_size × grad_accum``."""

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

    def total_steps(self, num_examples: int) -> int:
        """Optimizer steps for ``num_examples`` training examples."""
        per_epoch = math.ceil(num_examples / self.batch_size / self.grad_accum)
        steps = math.ceil(per_epoch * self.epochs)
        return min(steps, self.max_steps) if self.max_steps else steps


@dataclass
class TrainerState:
    """Counters that, with the tensors, make a run resumable."""

    step: int = 0
    micro_step: int = 0  # batches consumed since the start (over all epochs)
    best_dev_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class NonFiniteLossError(RuntimeError):
    pass


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


def _autocast(precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[EncodedExample], batch_size: int, pad_id: int,
                  precision: str = "fp32", collate_fn: Callable[..., dict[str, torch.Tensor]] = collate) -> float:
    """Mean per-token loss over ``examples`` (target tokens only)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate_fn(list(examples[i : i + batch_size]), pad_id).items()}
        n = int((batch["labels"] != -100).sum())  # labelled tokens (or rows, for classification)
        with _autocast(precision):
            loss = model(**batch).loss
        total += float(loss.detach()) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _save_state(out: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, state: TrainerState) -> None:
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
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
        "scheduler": sched.state_dict() if sched is not None else None,
    }
    atomic_write_text(out / STATE_NAME, json.dumps(meta, indent=2) + "\n")
    for old in out.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def _load_state(out: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> TrainerState:
    meta_path = out / STATE_NAME
    meta = json.loads(meta_path.read_text())
    tensor_path = out / meta["tensors"]
    if sha256_file(tensor_path) != meta["tensors_sha256"]:
        raise ValueError(f"{tensor_path}: sha256 does not match {meta_path} field 'tensors_sha256'")
    tensors = load_file(str(tensor_path))
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
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not train:
        raise ValueError("no training examples")
    params = list(_trainable(model).values())
    if not params:
        raise ValueError("the model has no trainable parameters")
    device = params[0].device
    total = config.total_steps(len(train))
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.warmup_steps, total))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    state = TrainerState()
    if resume and (out / STATE_NAME).is_file():
        state = _load_state(out, model, opt, sched)
        _truncate_log(out / LOG_NAME, state.step)  # steps after the checkpoint are replayed and logged again
    else:
        torch.manual_seed(config.seed)
        (out / LOG_NAME).unlink(missing_ok=True)
        _save_state(out, model, opt, sched, state)  # step 0: a resume target before any step
    if state.stopped:
        return state

    def log(record: dict[str, Any]) -> None:
        state.history.append(record)
        with open(out / LOG_NAME, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    per_epoch = math.ceil(len(train) / config.batch_size)
    bar = tqdm(total=total, initial=state.step, disable=not progress, desc="train", unit="step")
    model.train()
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    last_good_loss = None
    saved_step = state.step
    try:
        while state.step < total:
            epoch, index = divmod(state.micro_step, per_epoch)
            batches = _batches_of_epoch(len(train), config.batch_size, config.seed, epoch)
            step_loss = 0.0
            for _ in range(config.grad_accum):
                idx = batches[index]
                batch = {k: v.to(device) for k, v in collate_fn([train[i] for i in idx], pad_id).items()}
                with _autocast(config.precision):
                    loss = model(**batch).loss / config.grad_accum
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"non-finite loss ({float(loss.detach())}) at step {state.step + 1} "
                        f"(epoch {epoch}, batch {index}); last good loss {last_good_loss}; "
                        f"the last checkpoint (step {saved_step}) is kept"
                    )
                loss.backward()
                step_loss += float(loss.detach())
                window_tokens += int(batch["attention_mask"].sum())
                state.micro_step += 1
                epoch, index = divmod(state.micro_step, per_epoch)
                if index == 0:
                    break  # an epoch boundary ends the accumulation window
                batches = _batches_of_epoch(len(train), config.batch_size, config.seed, epoch)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state.step += 1
            last_good_loss = step_loss
            window_loss += step_loss
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
                    if save_best:
                        save_best(out / "best")
                else:
                    state.evals_without_improvement += 1
                    if config.early_stopping and state.evals_without_improvement >= config.early_stopping:
                        state.stopped = (f"early stopping after {state.evals_without_improvement} "
                                         "evaluations without improvement")
            evaluated = bool(dev and config.eval_every and state.step % config.eval_every == 0)
            if state.step % config.checkpoint_every == 0 or evaluated:
                _save_state(out, model, opt, sched, state)
                saved_step = state.step
            if on_step:
                on_step(state)
            if state.stopped:
                break
    finally:
        bar.close()
    if not state.stopped:
        state.stopped = "finished"
    if save_best and (not dev or not config.eval_every):
        save_best(out / "best")
    _save_state(out, model, opt, sched, state)
    return state
