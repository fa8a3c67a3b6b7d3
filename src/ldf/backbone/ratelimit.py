"""A token bucket that caps the bandwidth of a link between two sites.

One `RateLimiter` is shared by every transfer on a link (source site → destination site).
Each transfer asks for the bytes it is about to move; the limiter reserves them at once and
tells the caller how long to wait, so concurrent callers queue fairly without holding a lock
while they sleep.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from ldf.errors import UserInputError

__all__ = ["RateLimiter"]


class RateLimiter:
    """Token bucket limiting bytes per second; thread-safe.

    Parameters
    ----------
    rate
        Bytes per second; ``None`` means unlimited (`acquire` never sleeps).
    burst
        Bucket capacity in bytes: how much may pass at once after a pause. Defaults to one
        second's worth of ``rate`` (at least 1 MiB).
    clock
        Monotonic clock in seconds (injectable for tests).
    sleep
        Function that sleeps for a number of seconds (injectable for tests).

    Notes
    -----
    A request larger than the bucket is allowed: it drives the bucket into debt and the
    caller (and the next callers) wait until the debt is repaid. Over any long run the bytes
    passed are at most ``burst + rate × elapsed``.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise UserInputError(f"rate must be > 0 bytes/s or None (unlimited), got {rate}")
        if burst is not None and burst <= 0:
            raise UserInputError(f"burst must be > 0 bytes, got {burst}")
        self.rate = rate
        """Bytes per second, or None for unlimited."""
        self.burst = burst if burst is not None else max(int(rate or 0), 1 << 20)
        """Bucket capacity in bytes."""
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = float(self.burst)
        self._last = clock()
        self.total_bytes = 0
        """Bytes acquired so far."""
        self.total_wait_s = 0.0
        """Seconds of waiting this limiter has asked for so far (sum over callers)."""

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` from the bucket now; return the seconds to wait before sending them.

        Use this directly from code that waits its own way; `acquire` and `acquire_async` wrap it.
        """
        if nbytes < 0:
            raise UserInputError(f"cannot acquire a negative number of bytes ({nbytes})")
        with self._lock:
            self.total_bytes += nbytes
            if self.rate is None or nbytes == 0:
                return 0.0
            now = self._clock()
            self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            self.total_wait_s += wait
            return wait

    def acquire(self, nbytes: int) -> float:
        """Block until ``nbytes`` may be sent; return the seconds slept.

        From asyncio, call `acquire_async` (or this in ``asyncio.to_thread``).
        """
        wait = self.reserve(nbytes)
        if wait > 0:
            self._sleep(wait)
        return wait

    async def acquire_async(self, nbytes: int) -> float:
        """Like `acquire`, sleeping with ``asyncio.sleep`` so the event loop keeps running."""
        wait = self.reserve(nbytes)
        if wait > 0:
            await asyncio.sleep(wait)
        return wait

    def __repr__(self) -> str:
        rate = "unlimited" if self.rate is None else f"{self.rate:.0f} B/s"
        return f"RateLimiter({rate}, burst={self.burst})"
