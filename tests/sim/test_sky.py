"""The simulated sky (stars, transients, variables) and observing conditions."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from ldf.errors import UserInputError
from ldf.sim.conditions import (
    DARK_SKY_MAG,
    SYSTEM_FWHM_ARCSEC,
    conditions_for,
    moon_illumination,
)
from ldf.sim.sky import (
    INJECTED_DTYPE,
    KIND_PERIODIC,
    KIND_SN,
    KIND_STEP,
    Sky,
    galactic_latitude,
    light_curve_mag,
)


def test_stars_are_deterministic_and_tile_consistent() -> None:
    a = Sky(11).stars(150.0, -30.0, 0.3)
    b = Sky(11).stars(150.0, -30.0, 0.3)
    assert a.tobytes() == b.tobytes()
    # An overlapping query around another centre sees exactly the same stars in the overlap.
    c = Sky(11).stars(150.2, -29.9, 0.3)
    common = np.intersect1d(a["source_id"], c["source_id"])
    assert len(common) > 100
    sa = a[np.isin(a["source_id"], common)]
    sc = c[np.isin(c["source_id"], common)]
    sa.sort(order="source_id")
    sc.sort(order="source_id")
    assert sa.tobytes() == sc.tobytes()
    assert len(np.unique(a["source_id"])) == len(a)
    d = Sky(12).stars(150.0, -30.0, 0.3)
    assert a.tobytes() != d.tobytes()


def test_stars_across_ra_zero_and_near_pole() -> None:
    sky = Sky(1)
    around_zero = sky.stars(0.05, 10.0, 0.2)
    assert np.any(around_zero["ra"] > 359.0)
    assert np.any(around_zero["ra"] < 1.0)
    pole = sky.stars(0.0, -89.9, 0.2)
    assert len(pole) > 0
    assert np.all(pole["dec"] < -89.6)


def test_star_counts_and_colours() -> None:
    sky = Sky(5)
    radius = 0.25
    area = math.pi * radius**2
    high = sky.stars(192.86, 27.13, radius)  # North Galactic pole
    plane = sky.stars(266.4, -29.0, radius)  # Galactic centre direction
    assert abs(float(galactic_latitude(266.4, -29.0))) < 2.0
    n_high = np.count_nonzero(high["r"] < 24) / area
    n_plane = np.count_nonzero(plane["r"] < 24) / area
    assert 2_000 < n_high < 10_000
    assert 5e4 < n_plane < 3e5
    gr = high["g"] - high["r"]
    assert 0.2 < np.median(gr) < 1.5
    assert np.all(high["u"] - high["g"] > 0.5)  # stars are red in u − g
    assert high["r"].min() >= 11.0
    assert high["r"].max() <= 25.0


def test_transients_are_deterministic_and_have_light_curves() -> None:
    sky = Sky(3, transient_rate_deg2=2000.0)
    tr = sky.transients(10.0, -40.0, 0.5, 61000.0)
    assert len(tr) > 100
    assert (
        tr.tobytes()
        == Sky(3, transient_rate_deg2=2000.0).transients(10.0, -40.0, 0.5, 61000.0).tobytes()
    )
    assert set(np.unique(tr["kind"])) == {KIND_SN, KIND_STEP}
    sn = tr[tr["kind"] == KIND_SN]
    offsets = np.linspace(-40.0, 200.0, 2401)
    mags = np.stack([light_curve_mag(sn, "r", sn["t0"] + dt) for dt in offsets])
    best = np.argmin(mags, axis=0)
    assert np.all((best > 0) & (best < len(offsets) - 1))  # each rises, then declines
    peaks = mags.min(axis=0)
    assert peaks.min() >= 18.0
    assert peaks.max() <= 23.01
    assert np.all(np.isinf(mags[0]) | (mags[0] > peaks))


def test_step_transient_appears_at_t0() -> None:
    src = np.zeros(1, INJECTED_DTYPE)
    src["kind"], src["mag0"], src["t0"], src["duration"] = KIND_STEP, 20.0, 61000.5, 2.0
    assert np.isinf(light_curve_mag(src, "g", 61000.49)[0])
    assert light_curve_mag(src, "r", 61000.51)[0] == pytest.approx(20.0)
    assert np.isinf(light_curve_mag(src, "r", 61002.6)[0])


def test_periodic_variable_repeats() -> None:
    sky = Sky(8, variable_density_deg2=500.0)
    var = sky.variables(40.0, 5.0, 0.3)
    assert len(var) > 20
    assert np.all(var["kind"] == KIND_PERIODIC)
    v = var[:1]
    period = float(v["period"][0])
    m1 = light_curve_mag(v, "r", 61000.123)[0]
    m2 = light_curve_mag(v, "r", 61000.123 + 3 * period)[0]
    assert m1 == pytest.approx(m2, abs=1e-4)
    phases = 61000.0 + np.linspace(0, period, 200)
    mags = np.array([light_curve_mag(v, "r", t)[0] for t in phases])
    assert mags.max() - mags.min() == pytest.approx(float(v["amplitude"][0]), rel=0.05)


def test_conditions_deterministic_and_scaling() -> None:
    a = conditions_for(4, 61000.2, "r", 1.0)
    assert a == conditions_for(4, 61000.2, "r", 1.0)
    assert a != conditions_for(5, 61000.2, "r", 1.0)
    x = conditions_for(4, 61000.2, "r", 2.0)
    assert x.seeing_fwhm_arcsec / a.seeing_fwhm_arcsec == pytest.approx(2.0**0.6, rel=1e-3)
    # The atmosphere's part scales with λ^-0.2; the telescope's and camera's does not.
    u = conditions_for(4, 61000.2, "u", 1.0)
    atm_r = math.sqrt(a.seeing_fwhm_arcsec**2 - SYSTEM_FWHM_ARCSEC**2)
    atm_u = atm_r * (368.0 / 622.0) ** -0.2
    assert u.seeing_fwhm_arcsec == pytest.approx(math.hypot(atm_u, SYSTEM_FWHM_ARCSEC), rel=1e-3)
    seeing = [conditions_for(9, 61000.0 + k * 1.37, "r", 1.0).seeing_fwhm_arcsec for k in range(80)]
    assert 0.55 < float(np.median(seeing)) * (622 / 500) ** 0.2 < 0.9
    # Delivered images are never sharper than the telescope and camera make them.
    assert min(seeing) > SYSTEM_FWHM_ARCSEC
    assert all(0 < c <= 1 for c in (a.transparency, x.transparency))


def test_moon_phase_and_sky_brightness() -> None:
    assert moon_illumination(60334.746) > 0.98  # full moon 2024-01-25
    assert moon_illumination(60320.498) < 0.02  # new moon 2024-01-11
    # Sample a lunation: moonlit skies are brighter than dark ones in every band's sense.
    bright, dark = [], []
    # Around full moon (2024-01-25) and new moon (2024-01-11), every ~1.4 h for two days each.
    for mjd in [*np.arange(60319.5, 60321.5, 0.06), *np.arange(60333.7, 60335.7, 0.06)]:
        c = conditions_for(2, float(mjd), "g", 1.2)
        if c.moon_alt_deg > 30 and c.moon_illumination > 0.9:
            bright.append(c.sky_mag_arcsec2)
        elif c.moon_alt_deg < -10:
            dark.append(c.sky_mag_arcsec2)
    assert bright
    assert dark
    assert np.median(dark) == pytest.approx(DARK_SKY_MAG["g"] - 2.5 * math.log10(1.2), abs=0.3)
    assert np.median(bright) < np.median(dark) - 1.5


def test_conditions_reject_bad_input() -> None:
    with pytest.raises(UserInputError):
        conditions_for(1, 61000.0, "q", 1.0)
    with pytest.raises(UserInputError):
        conditions_for(1, 61000.0, "r", 0.5)


def test_sky_pickles_without_its_cache() -> None:
    sky = Sky(21, transient_rate_deg2=100.0)
    before = sky.stars(30.0, -10.0, 0.2)
    clone = pickle.loads(pickle.dumps(sky))  # noqa: S301 - our own object, round trip
    assert clone.transient_rate_deg2 == 100.0
    assert clone.stars(30.0, -10.0, 0.2).tobytes() == before.tobytes()
