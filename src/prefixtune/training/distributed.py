"""Several processes (ranks) on PyTorch's own distributed engine, as ``torchrun`` or ``accelerate launch`` start them.

A small interface over ``torch.distributed`` that the training loop and the jobs use; with one process
(no ``WORLD_SIZE`` > 1 in the environment and no process group) every function is a no-op that returns
its input, so single-process code paths are unchanged.

Data parallelism, as ``train.fit`` uses it:

* every rank holds the whole (frozen) model and the whole data set, and takes its share of each global
  batch (``shard_range``); the global batch order is the one a single process would use;
* gradients of the trainable tensors are summed over ranks by one explicit all-reduce after the
  accumulation window (``sum_gradients``), not by wrapping the model in ``DistributedDataParallel``:
  a prefix is a few tensors, one flat all-reduce per optimizer step is the least communication, it needs
  no ``no_sync`` bookkeeping for gradient accumulation, and it does not interact with gradient
  checkpointing's recomputation or with ranks that have no examples in the last, short batch of an
  epoch. The loop scales each rank's loss so that the *sum* is the single-process loss;
* ranks share one random stream: rank 0's RNG state is broadcast at every step (``sync_rng``), so the
  prefix dropout mask (one per forward pass) is the one a single process draws, and a run resumed from
  rank 0's saved RNG state continues as it would have.

``shard_model`` shards the frozen base model's blocks with FSDP2 (``torch.distributed.fsdp.fully_shard``)
when the base model does not fit on one device; the prefix itself stays whole on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from prefixtune.errors import RankFailedError

T = TypeVar("T")
R = TypeVar("R")


def init_from_env() -> bool:
    """Join the process group described by the environment (``torchrun`` / ``accelerate launch`` set
    ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); True when distributed.

    Backend ``nccl`` with one CUDA device per process (``cuda:LOCAL_RANK``) where CUDA is available,
    else ``gloo`` on the CPU. Idempotent; does nothing when ``WORLD_SIZE`` is unset or 1.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")
    return True


def close() -> None:
    """Leave the process group (if one was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank, 0 … world_size() - 1."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """How many processes train together (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``), which picks its CUDA device."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the only rank that writes logs, checkpoints, run records, predictions and progress bars."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` where CUDA is available, else the CPU."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (pickled; for small objects and once-per-run state)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over ranks of a few numbers (float64)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def sum_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace each parameter's ``.grad`` by its sum over ranks (one flat all-reduce).

    A parameter without a gradient on this rank counts as zeros, so every rank ends with the same
    gradients and takes the same optimizer step.
    """
    if not is_distributed():
        return
    params = list(params)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


@torch.no_grad()
def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank (what DDP does when it wraps a model)."""
    if not is_distributed():
        return
    for p in params:
        dist.broadcast(p.data, src=src)


def sync_rng(src: int = 0) -> None:
    """Give every rank rank ``src``'s CPU (and CUDA) random state."""
    if not is_distributed():
        return
    states = broadcast_object(
        (torch.get_rng_state(), torch.cuda.get_rng_state() if torch.cuda.is_available() else None), src)
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1])


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous share of ``n`` items; shares differ in size by at most one, low ranks first."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    k, m = divmod(n, world)
    start = rank_ * k + min(rank_, m)
    return range(start, start + k + (rank_ < m))


def gather_in_order(local: Sequence[T], n: int) -> list[T]:
    """Every rank's results of its strided share (items ``rank, rank + world, …`` of ``n``), in item order,
    on every rank."""
    if not is_distributed():
        return list(local)
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, list(local))
    out: list[T] = []
    for i in range(n):
        out.append(parts[i % len(parts)][i // len(parts)])
    return out


def map_in_order(fn: Callable[[list[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
    """``fn(items)`` computed by all ranks together: each rank runs ``fn`` on its strided share
    (``items[rank::world]``, which mixes long and short items alike) and every rank gets all results in
    item order. ``fn`` must return one result per item."""
    mine = list(items[rank() :: world_size()])
    local = fn(mine)
    if len(local) != len(mine):
        raise ValueError(f"map_in_order: {len(local)} results for {len(mine)} items")
    return gather_in_order(local, len(items))


# ----------------------------------------------------------------------------- FSDP


def shard_model(model: nn.Module, keep_whole: Sequence[str] = ()) -> list[str]:
    """Shard the blocks of a (frozen) transformers model over all ranks with FSDP2's ``fully_shard``.

    The blocks are the modules whose class the model names in ``_no_split_modules`` (its decoder or
    encoder layers); embeddings, final norm and heads stay whole on every rank, and so does every block
    whose path is a prefix of a name in ``keep_whole``. Each block's weights are gathered for its forward
    and backward pass and freed after, so every rank must run the same number of forward and backward
    passes. Returns the paths of the sharded blocks. Does nothing with one process.
    """
    if not is_distributed():
        return []
    classes = set(getattr(model, "_no_split_modules", None) or ())
    if not classes:
        raise ValueError(f"{type(model).__name__} names no blocks (_no_split_modules) to shard with FSDP")
    mesh = init_device_mesh(_comm_device().type, (world_size(),))
    sharded = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes and not any(k == name or k.startswith(name + ".") for k in keep_whole):
            fully_shard(module, mesh=mesh)
            sharded.append(name)
    if not sharded:
        raise ValueError(f"{type(model).__name__}: no module of the classes {sorted(classes)} to shard")
    return sharded


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. a download into a shared cache), then the other ranks."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 only (it reads or writes the run directory); its result, or the error it raised,
    on every rank, so that all ranks stop with the same message and none waits at a broadcast for ever.

    Rank 0 re-raises its own exception, whatever its type; the other ranks raise `RankFailedError` carrying
    its type name and message (exceptions are not pickled across ranks: not every one can be).
    """
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = ("ok", fn())
        except Exception as exc:  # any type: the other ranks must hear of it
            error = exc
            result = ("error", type(exc).__name__, str(exc))
    message = broadcast_object(result)
    if error is not None:
        raise error
    if message[0] == "error":
        raise RankFailedError(message[1], message[2])
    return message[1]
