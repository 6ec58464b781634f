"""Which requests run: a bounded waiting queue, the running set, admission between steps (no tensors here).

As in nano-vllm, the scheduler decides and the engine computes: ``add`` queues a request (any
thread), ``schedule`` picks the waiting requests that join the running set this step, ``cancelled``
and ``release`` take requests out. It never touches a cache, a mask or a model.
"""

from __future__ import annotations

import threading
from collections import deque

from prefixtune.errors import QueueFullError
from prefixtune.serving.batch import Sequence


class Scheduler:
    """Waiting and running requests under ``max_batch_size`` / ``max_waiting`` / ``max_prefill_batch``."""

    def __init__(self, max_batch_size: int, max_waiting: int, max_prefill_batch: int) -> None:
        self.max_batch_size, self.max_waiting, self.max_prefill_batch = max_batch_size, max_waiting, max_prefill_batch
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)

    def add(self, seq: Sequence) -> None:
        """Queue ``seq`` (thread-safe); QueueFullError when ``max_waiting`` requests already wait."""
        with self.wake:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFullError(f"request {seq.gen.request_id}: {len(self.waiting)} requests already waiting "
                                     f"(max_waiting={self.max_waiting})")
            self.waiting.append(seq)
            self.wake.notify()

    def schedule(self) -> list[Sequence]:
        """The waiting requests that join now (oldest first), moved to the running set."""
        with self.lock:
            room = min(self.max_batch_size - len(self.running), self.max_prefill_batch)
            joiners = [self.waiting.popleft() for _ in range(max(0, min(room, len(self.waiting))))]
            self.running.extend(joiners)
        return joiners

    def cancelled(self) -> list[Sequence]:
        """Requests whose client asked to stop, taken out of the waiting queue (running ones stay
        listed until ``release``: the engine must first take them out of their batch)."""
        with self.lock:
            waiting = [s for s in self.waiting if s.gen._cancel.is_set()]
            if waiting:
                self.waiting = deque(s for s in self.waiting if not s.gen._cancel.is_set())
            running = [s for s in self.running if s.gen._cancel.is_set() and not s.gen.done]
        return waiting + running

    def release(self) -> None:
        """Forget running requests that have finished."""
        with self.lock:
            self.running = [s for s in self.running if not s.gen.done]

    def idle(self) -> bool:
        with self.lock:
            return not self.waiting and not self.running

    def drain(self) -> list[Sequence]:
        """Every request, waiting or running, removed (engine stop)."""
        with self.lock:
            seqs = [*self.waiting, *self.running]
            self.waiting, self.running = deque(), []
        return seqs

    def counts(self) -> tuple[int, int]:
        """(waiting, running)."""
        with self.lock:
            return len(self.waiting), len(self.running)
