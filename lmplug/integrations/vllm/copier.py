"""A thread that moves KV between lmplug's chunks and vLLM's CPU blocks while the forward computes.

On CUDA, layer-wise loads overlap with compute through a side stream. On the CPU the
equivalent is a thread: the worker queues one job per layer (the scatter of its loaded KV
before the forward, the gather of its new KV as attention finishes with it), and attention
waits only for its own layer's job. vLLM's CPU build binds its compute threads to their
cores and threads inherit that binding; this thread moves to the cores the forward does
not use (when there are any: on a small machine, the core vLLM reserves for its scheduler,
which waits while the worker computes), so it runs beside the forward instead of taking
turns with it. (The cache's own thread, which answers lookups, stays where it was: moved
there too, beside vLLM's scheduler, the scheduler's lookups took about twice as long.)
What the forward still waits for is measured by the ``vllm_chat`` benchmark.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def _compute_cores() -> set[int]:
    """The cores the calling thread may run on (in vLLM's worker: the ones it binds compute to)."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set()


def _move_beside(busy: set[int]) -> None:
    """Move the calling thread off the cores in ``busy`` (the forward's), when others may be used."""
    # Not Linux, or no core to spare (or a cpuset narrower than the machine): keep the inherited binding.
    with contextlib.suppress(AttributeError, OSError, ValueError):
        spare = set(range(os.cpu_count() or 1)) - busy
        if spare:
            os.sched_setaffinity(0, spare)


class Copier:
    """One copy thread; jobs run in the order they are queued, under ``torch.inference_mode``."""

    def __init__(self) -> None:
        busy = _compute_cores()  # the creating thread's: vLLM binds its compute there
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lmplug-copy", initializer=_move_beside, initargs=(busy,))

    def submit(self, job: Callable[[], object]) -> Future[object]:
        return self._pool.submit(self._run, job)

    @staticmethod
    def _run(job: Callable[[], object]) -> object:
        # vLLM's KV cache tensors are written under inference mode, as vLLM itself writes them.
        with torch.inference_mode():
            return job()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
