"""The warm pool: a broken pool is replaced and leaves no worker behind."""

from __future__ import annotations

import os
import signal
import time

from ldf.prompt.pool import WarmPool, _ping


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def test_replacing_a_broken_pool_stops_its_surviving_workers() -> None:
    pool = WarmPool(2)
    try:
        pool.warm_up()
        first, second = pool.worker_pids()
        os.kill(first, signal.SIGKILL)
        # What the service does when a future fails with BrokenProcessPool.
        pool.replace()
        deadline = time.monotonic() + 10
        while _alive(second) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(second)
        assert pool.restarts == 1
        assert pool.submit(_ping).result(timeout=60) not in (first, second)
    finally:
        pool.close()
