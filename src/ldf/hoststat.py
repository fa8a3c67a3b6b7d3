"""What the host did to a measurement: CPU time a hypervisor took from this machine (steal).

On a virtual machine whose host is oversubscribed, ``/proc/stat``'s *steal* counter grows
with the time this machine's CPUs wanted to run and another guest ran instead. Benchmarks
report the share of their run's CPU demand it took, so a figure measured while the host was
busy reads as such (on this project's 2-core VM the same benchmark ran 1.5-2x slower while
20-35 % of the demand was stolen). Linux only; elsewhere the figure is None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuSample", "steal_fraction"]


@dataclass(frozen=True)
class CpuSample:
    """The machine's cumulative CPU time (clock ticks): busy and stolen."""

    busy: int
    steal: int

    @classmethod
    def now(cls) -> CpuSample | None:
        """Read ``/proc/stat`` (None where there is none)."""
        try:
            line = Path("/proc/stat").read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        fields = line.split()
        if fields[0] != "cpu" or len(fields) < 9:
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
        return cls(busy=user + nice + system + irq + softirq, steal=steal)


def steal_fraction(before: CpuSample | None, after: CpuSample | None) -> float | None:
    """The share of the CPU time wanted between two samples that the host took (0-1)."""
    if before is None or after is None:
        return None
    busy, steal = after.busy - before.busy, after.steal - before.steal
    if busy + steal <= 0:
        return 0.0
    return round(steal / (busy + steal), 3)
