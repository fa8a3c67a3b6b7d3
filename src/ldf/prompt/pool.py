"""A pool of warm worker processes that survives the death of a worker.

Why not ``pipetask -j``: it starts a process per quantum, and each pays ~2 s of imports
(``notes/rubin-middleware.md``). Here the workers are forked from a *forkserver* that has
already imported the whole stack (:mod:`ldf.prompt.worker` and everything it imports), so a
worker, even a replacement, starts warm; and each worker runs detector after detector.

``concurrent.futures.ProcessPoolExecutor`` notices a worker that dies (``kill -9``, OOM)
and fails every future in flight with ``BrokenProcessPool``; :class:`WarmPool` then builds a
new executor and tells the caller which jobs were lost, so it can retry or report them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

__all__ = ["WarmPool"]

_PRELOAD = ["ldf.prompt.worker"]

_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "17179869184"}
"""glibc: keep freed memory in the worker instead of returning it to the kernel, so each
detector's big temporaries do not page-fault afresh (measured: ~10 % of difference imaging)."""


class WarmPool:
    """``workers`` warm processes running ``ldf.prompt.worker`` functions.

    Parameters
    ----------
    workers
        Number of processes.
    initializer, initargs
        Run once in each worker (e.g. to hand it the QA queue).
    """

    def __init__(
        self,
        workers: int,
        *,
        initializer: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
    ) -> None:
        self.workers = workers
        for key, value in _MALLOC_ENV.items():  # inherited by the forkserver and its workers
            os.environ.setdefault(key, value)
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(_PRELOAD)
        self._initializer = initializer
        self._initargs = initargs
        self._lock = threading.Lock()
        self._executor = self._new_executor()
        self.restarts = 0

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=self._ctx,
            initializer=self._initializer,
            initargs=self._initargs,
        )

    @property
    def context(self) -> Any:
        """The multiprocessing context (for queues shared with the workers)."""
        return self._ctx

    def warm_up(self) -> None:
        """Start every worker now (instead of at the first job) and wait until they are up."""
        futures = [self.submit(_ping) for _ in range(self.workers)]
        for f in futures:
            f.result()

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in a worker; a broken pool is replaced first."""
        with self._lock:
            try:
                return self._executor.submit(fn, *args)
            except (BrokenProcessPool, RuntimeError):
                self._replace_locked()
                return self._executor.submit(fn, *args)

    def replace(self) -> None:
        """Build a new executor after a worker died (idempotent per breakage)."""
        with self._lock:
            self._replace_locked()

    def _replace_locked(self) -> None:
        old = self._executor
        survivors = list((getattr(old, "_processes", None) or {}).values())
        old.shutdown(wait=False, cancel_futures=True)
        # A broken pool's surviving workers can wait on its call queue for ever (the
        # forkserver keeps a copy of the pipe open): stop them, or each breakage leaves a
        # process behind.
        for proc in survivors:
            if proc.is_alive():
                proc.kill()
        self._executor = self._new_executor()
        self.restarts += 1

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (tests kill one)."""
        procs = getattr(self._executor, "_processes", None) or {}
        return [p.pid for p in procs.values() if p.is_alive()]

    def close(self) -> None:
        """Stop the workers (running jobs finish first)."""
        with self._lock:
            self._executor.shutdown(wait=True, cancel_futures=True)


def _ping() -> int:
    import os

    return os.getpid()
