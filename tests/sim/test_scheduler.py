"""The simulated scheduler's night plan."""

from __future__ import annotations

import pytest

from ldf.errors import UserInputError
from ldf.sim.models import ObsType
from ldf.sim.scheduler import NEXT_VISIT_LEAD_S, plan_night


@pytest.fixture(scope="module")
def plan():  # type: ignore[no-untyped-def]
    return plan_night("LSSTCam", day_obs=20261121, science_visits=20, seed=3)


def test_calibration_block_first_then_science(plan) -> None:  # type: ignore[no-untyped-def]
    types = [p.visit.obs_type for p in plan.exposures]
    first_science = types.index(ObsType.SCIENCE)
    assert set(types[:first_science]) == {ObsType.BIAS, ObsType.DARK, ObsType.FLAT}
    assert all(t is ObsType.SCIENCE for t in types[first_science:])
    assert types.count(ObsType.SCIENCE) == 20
    biases = [p.visit for p in plan.exposures if p.visit.obs_type is ObsType.BIAS]
    assert all(v.exp_time_s == 0 for v in biases)
    # Calibrations happen in the afternoon, science after twilight (hours apart).
    last_calib = plan.exposures[first_science - 1].visit.start_tai_mjd
    assert (plan.exposures[first_science].visit.start_tai_mjd - last_calib) * 24 > 2


def test_identifiers_follow_rubin(plan) -> None:  # type: ignore[no-untyped-def]
    seqs = [p.visit.seq_num for p in plan.exposures]
    assert seqs == list(range(1, len(seqs) + 1))
    v = plan.exposures[0].visit
    assert v.obs_id == "MC_O_20261121_000001"
    assert v.exposure_id == 2026112100001


def test_next_visit_at_least_20s_ahead_and_ordered(plan) -> None:  # type: ignore[no-untyped-def]
    for p in plan.exposures:
        lead = (p.visit.start_tai_mjd - p.next_visit_tai_mjd) * 86400
        assert lead >= 20 - 1e-6
        assert lead >= NEXT_VISIT_LEAD_S - 1e-6 or lead > 20
    starts = [p.visit.start_tai_mjd for p in plan.exposures]
    assert starts == sorted(starts)
    # Exposures never overlap: next start after previous readout.
    for a, b in zip(plan.exposures, plan.exposures[1:], strict=False):
        assert b.visit.start_tai_mjd >= a.visit.end_tai_mjd


def test_wfd_pairs_same_field_same_filter(plan) -> None:  # type: ignore[no-untyped-def]
    wfd = [p.visit for p in plan.exposures if p.visit.reason == "wfd"]
    groups: dict[str, list] = {}  # type: ignore[type-arg]
    for v in wfd:
        groups.setdefault(v.group_id[:-2], []).append(v)
    assert groups
    for visits in groups.values():
        firsts = [v for v in visits if v.group_id.endswith("-a")]
        seconds = [v for v in visits if v.group_id.endswith("-b")]
        assert len(seconds) <= len(firsts)
        for a, b in zip(firsts, seconds, strict=False):
            assert (a.ra_deg, a.dec_deg, a.band) == (b.ra_deg, b.dec_deg, b.band)
            assert b.start_tai_mjd > a.start_tai_mjd


def test_ddf_sequence_no_slew(plan) -> None:  # type: ignore[no-untyped-def]
    ddf = [p.visit for p in plan.exposures if p.visit.reason == "ddf"]
    assert len(ddf) == 5  # a quarter of 20
    assert len({(v.ra_deg, v.dec_deg) for v in ddf}) == 1
    seqs = [v.seq_num for v in ddf]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # back to back


def test_science_visits_are_up_and_stamped(plan) -> None:  # type: ignore[no-untyped-def]
    for p in plan.exposures:
        v = p.visit
        if v.obs_type is ObsType.SCIENCE:
            assert v.alt_deg > 30
            assert 1 <= v.airmass < 2.0
            assert v.band in "ugrizy"


def test_same_seed_same_plan_other_seed_other_fields() -> None:
    a = plan_night("LSSTCam", day_obs=20261121, science_visits=6, seed=5, calibrations=False)
    b = plan_night("LSSTCam", day_obs=20261121, science_visits=6, seed=5, calibrations=False)
    c = plan_night("LSSTCam", day_obs=20261121, science_visits=6, seed=6, calibrations=False)
    assert a == b
    assert [p.visit.ra_deg for p in a.exposures] != [p.visit.ra_deg for p in c.exposures]


def test_latiss_plan_spectra() -> None:
    plan = plan_night("LATISS", day_obs=20261121, science_visits=3, seed=1)
    sci = [p.visit for p in plan.exposures if p.visit.obs_type is ObsType.SCIENCE]
    assert len(sci) == 3
    assert all(v.physical_filter and "holo" in v.physical_filter for v in sci)
    assert plan.exposures[0].visit.obs_id.startswith("AT_O_20261121_")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"instrument": "HSC"}, "unknown instrument"),
        ({"science_visits": -1}, "science_visits"),
        ({"day_obs": 20261341}, "day_obs must be a date"),
        ({"science_visits": 5000}, "do not fit"),
    ],
)
def test_bad_input(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    args = {"instrument": "LSSTCam", "day_obs": 20261121, "science_visits": 1, "seed": 1}
    args.update(kwargs)
    with pytest.raises(UserInputError, match=message):
        plan_night(args.pop("instrument"), **args)
