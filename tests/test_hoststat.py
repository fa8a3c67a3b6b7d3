"""The host's CPU steal as benchmarks report it."""

from __future__ import annotations

import sys

import pytest

from ldf.hoststat import CpuSample, steal_fraction


def test_steal_fraction_of_two_samples() -> None:
    assert steal_fraction(CpuSample(busy=100, steal=10), CpuSample(busy=400, steal=110)) == 0.25
    assert steal_fraction(CpuSample(busy=5, steal=5), CpuSample(busy=5, steal=5)) == 0.0
    assert steal_fraction(None, CpuSample(busy=1, steal=0)) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_reads_this_machine() -> None:
    a = CpuSample.now()
    sum(i * i for i in range(200_000))  # some CPU time
    b = CpuSample.now()
    assert a is not None
    assert b is not None
    assert b.busy >= a.busy
    assert b.steal >= a.steal
    fraction = steal_fraction(a, b)
    assert fraction is not None
    assert 0.0 <= fraction <= 1.0
