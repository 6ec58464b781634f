"""The resume state of a training run, and the one place for a run directory's file names.

Written every ``checkpoint_every`` steps, at every evaluation and at the end, atomically: tensors (trainable
parameters, AdamW moments, RNG state) to ``state-<step>.safetensors``, then ``trainer_state.json`` naming that
file and its sha256 is renamed into place, which is the commit point.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prefixtune.errors import ConfigError
from prefixtune.files import atomic_write, atomic_write_text, sha256_file


@dataclass(frozen=True)
class RunFiles:
    """The file names of a run directory, written once."""

    record: str = "run.json"
    log: str = "log.jsonl"
    state: str = "trainer_state.json"
    plot: str = "loss.png"
    best: str = "best"
    demo_predictions: str = "test_predictions.txt"


FILES = RunFiles()


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


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` that train, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_state(out: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any, state: TrainerState,
                global_batch: int, world_size: int) -> None:
    names = {id(p): n for n, p in trainable(model).items()}
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in trainable(model).items()}
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
    atomic_write_text(out / FILES.state, json.dumps(meta, indent=2) + "\n")
    for old in out.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_state(out: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The committed resume state of ``out``: its JSON and its (checked) tensors."""
    meta_path = out / FILES.state
    meta = json.loads(meta_path.read_text())
    tensor_path = out / meta["tensors"]
    if sha256_file(tensor_path) != meta["tensors_sha256"]:
        raise ConfigError(f"{tensor_path}: sha256 does not match {meta_path} field 'tensors_sha256'")
    return meta, load_file(str(tensor_path))


def apply_state(out: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module,
                 opt: torch.optim.Optimizer, sched: Any, batch_size: int, world_size: int) -> TrainerState:
    """Load a state read by ``read_state`` into the model, optimizer, scheduler and RNG."""
    saved_global = meta.get("global_batch_size", batch_size)  # states written before ranks existed: one process
    if saved_global != batch_size * world_size:
        hint = (f"pass --batch-size {saved_global // world_size} to resume on {world_size} rank(s)"
                if saved_global % world_size == 0 else f"use a number of ranks that divides {saved_global}")
        raise ConfigError(f"{out / FILES.state}: saved with a global batch of {saved_global} examples (batch size "
                         f"per rank × {meta.get('world_size', 1)} rank(s)); now {batch_size} × {world_size} = "
                         f"{batch_size * world_size}; {hint}")
    tensor_path = out / meta["tensors"]
    params = trainable(model)
    missing = [n for n in params if f"param.{n}" not in tensors]
    if missing:
        raise ConfigError(f"{tensor_path}: no saved value for trainable parameter(s) {missing[:5]}")
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


def truncate_log(path: Path, step: int) -> None:
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
