"""The simulated scheduler: a night plan with the shape of Rubin's.

A night is an afternoon calibration block (biases, darks, flats; closed dome), then, from the
end of astronomical twilight, wide-fast-deep (WFD) visits taken in *pairs*: a block of fields
observed in one filter and revisited in the same order and filter about half an hour later (the
pair is how moving objects are told from transients), and one deep-drilling (DDF) sequence of
back-to-back visits at a single field with no slew. LATISS takes its own calibrations and
spectra of a standard star.

Timing follows the survey's cadence: 30 s exposures, 2 s readout, a slew of a few seconds to
the next field (none within a DDF sequence), two minutes to change filters. The scheduler
announces each visit with ``nextVisit`` at least `NEXT_VISIT_LEAD_S` of simulated time before
the exposure starts, so prompt processing can preload.

Positions of the Sun and Moon, hour angles and airmasses come from astropy for Rubin's site.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta
from functools import lru_cache

import numpy as np
from astropy import units as u
from astropy.coordinates import AltAz, SkyCoord, get_sun
from astropy.time import Time

from ldf.errors import UserInputError
from ldf.sim.conditions import RUBIN_SITE, moon_illumination
from ldf.sim.models import ObservingConditions, ObsType, VisitSpec

__all__ = [
    "DDF_FIELDS",
    "NEXT_VISIT_LEAD_S",
    "RUBIN_SITE",
    "ConditionsModel",
    "NightPlan",
    "PlannedExposure",
    "plan_night",
]

NEXT_VISIT_LEAD_S = 25.0
"""Simulated seconds between nextVisit and the start of the exposure (Rubin: ≥ 20 s)."""

READOUT_S = 2.0
"""LSSTCam readout time."""

FILTER_CHANGE_S = 120.0
"""Time to change filters."""

SETTLE_S = 3.0
"""Settle time after a slew."""

SLEW_DEG_PER_S = 3.5
"""Slew speed (the telescope slews ~3.5° in ~4–5 s including settle)."""

CALIB_GAP_S = 10.0
"""Gap between closed-dome calibration exposures."""

DDF_FIELDS = {
    "COSMOS": (150.11, 2.18),
    "ECDFS": (53.13, -28.10),
    "ELAISS1": (9.45, -44.00),
    "XMM_LSS": (35.71, -4.75),
    "EDFS_a": (58.90, -49.32),
}
"""Rubin's deep-drilling fields (ra, dec in degrees)."""

LSSTCAM_FILTERS = {
    "u": "u_24",
    "g": "g_6",
    "r": "r_57",
    "i": "i_39",
    "z": "z_20",
    "y": "y_10",
}
"""LSSTCam physical filter names by band."""

LATISS_DISPERSED = "empty~holo4_003"
"""LATISS physical filter for spectroscopy (no filter, holographic disperser)."""

LATISS_STANDARDS = {
    "HD 38666": (86.5, -32.3),
    "HD 185975": (308.8, -87.5),
    "HD 14943": (35.5, -51.2),
}
"""Spectrophotometric standard stars LATISS observes (ra, dec)."""

type ConditionsModel = Callable[[VisitSpec, int], ObservingConditions]
"""Computes the atmosphere and sky for a planned visit (visit without conditions, seed)."""


@dataclass(frozen=True)
class PlannedExposure:
    """An exposure in the plan and when the scheduler announces it."""

    visit: VisitSpec
    """What will be taken."""
    next_visit_tai_mjd: float
    """When nextVisit is published (simulated TAI MJD)."""


@dataclass(frozen=True)
class NightPlan:
    """A night's exposures for one instrument, in order of start time."""

    instrument: str
    day_obs: int
    exposures: tuple[PlannedExposure, ...]

    def by_type(self) -> dict[str, int]:
        """Number of exposures per observation type."""
        counts: dict[str, int] = {}
        for p in self.exposures:
            counts[p.visit.obs_type.value] = counts.get(p.visit.obs_type.value, 0) + 1
        return counts


def _day_obs_noon(day_obs: int) -> Time:
    """Start of the observing day: 12:00 UTC of day_obs (Rubin's day_obs is UTC-12 h)."""
    d = date(day_obs // 10000, day_obs // 100 % 100, day_obs % 100)
    return Time(f"{d.isoformat()}T12:00:00", scale="utc")


@lru_cache(maxsize=16)
def _twilight(day_obs: int) -> tuple[Time, Time]:
    """Evening and morning -18° twilight for the night starting on day_obs."""
    t0 = _day_obs_noon(day_obs)
    grid = t0 + np.linspace(0, 24, 24 * 12 + 1) * u.hour
    alt = get_sun(grid).transform_to(AltAz(obstime=grid, location=RUBIN_SITE)).alt.deg
    dark = np.nonzero(alt < -18)[0]
    if dark.size == 0:  # pragma: no cover - never at Cerro Pachón
        raise UserInputError(f"no astronomical night on day_obs {day_obs}")
    return grid[dark[0]], grid[dark[-1]]


def _validate_day_obs(day_obs: int) -> None:
    try:
        date(day_obs // 10000, day_obs // 100 % 100, day_obs % 100)
    except ValueError:
        raise UserInputError(f"day_obs must be a date YYYYMMDD, got {day_obs}") from None


class _Clock:
    """Advances simulated time and stamps visits with pointing, airmass and conditions."""

    def __init__(
        self,
        instrument: str,
        day_obs: int,
        start: Time,
        conditions: ConditionsModel | None,
        seed: int,
    ) -> None:
        self.instrument = instrument
        self.day_obs = day_obs
        self.mjd = float(start.tai.mjd)
        self.seq = 0
        self.conditions = conditions
        self.seed = seed
        self.last_radec: tuple[float, float] | None = None
        self.last_filter: str | None = None
        self.exposures: list[PlannedExposure] = []

    def advance(self, seconds: float) -> None:
        self.mjd += seconds / 86400.0

    def _altaz(self, ra: float, dec: float) -> tuple[float, float]:
        t = Time(self.mjd, format="mjd", scale="tai")
        aa = SkyCoord(ra=ra * u.deg, dec=dec * u.deg).transform_to(
            AltAz(obstime=t, location=RUBIN_SITE)
        )
        return float(aa.alt.deg), float(aa.az.deg)

    def take(
        self,
        obs_type: ObsType,
        reason: str,
        group_id: str,
        *,
        band: str | None = None,
        physical_filter: str | None = None,
        ra: float | None = None,
        dec: float | None = None,
        exp_time: float = 30.0,
        program: str = "",
        slew: bool = True,
    ) -> VisitSpec:
        """Plan one exposure starting after the needed slew / filter change."""
        # Slew and filter change happen in parallel; the longer one sets the gap.
        gap = 0.0
        if ra is not None and dec is not None and self.last_radec is not None and slew:
            sep = SkyCoord(ra * u.deg, dec * u.deg).separation(
                SkyCoord(self.last_radec[0] * u.deg, self.last_radec[1] * u.deg)
            )
            if sep.deg > 0.01:
                gap = SETTLE_S + sep.deg / SLEW_DEG_PER_S
        if physical_filter and self.last_filter and physical_filter != self.last_filter:
            gap = max(gap, FILTER_CHANGE_S)
        self.advance(gap)
        self.seq += 1
        alt, az = (90.0, 0.0) if ra is None or dec is None else self._altaz(ra, dec)
        airmass = 1.0 / max(math.sin(math.radians(max(alt, 5.0))), 1e-3)
        visit = VisitSpec(
            instrument=self.instrument,
            day_obs=self.day_obs,
            seq_num=self.seq,
            obs_type=obs_type,
            reason=reason,
            program=program,
            group_id=group_id,
            band=band,
            physical_filter=physical_filter,
            ra_deg=(ra if ra is not None else 0.0) % 360.0,
            dec_deg=dec if dec is not None else -30.244639,
            rot_sky_deg=0.0,
            alt_deg=alt,
            az_deg=az,
            airmass=max(airmass, 1.0),
            exp_time_s=exp_time,
            dark_time_s=exp_time + (1.0 if exp_time > 0 else 0.0),
            start_tai_mjd=self.mjd,
        )
        if obs_type is ObsType.SCIENCE and self.conditions is not None:
            visit = visit.model_copy(update={"conditions": self.conditions(visit, self.seed)})
        # nextVisit goes out ahead of the exposure, never before the previous announcement.
        announce = self.mjd - NEXT_VISIT_LEAD_S / 86400.0
        if self.exposures:
            announce = max(announce, self.exposures[-1].next_visit_tai_mjd)
        self.exposures.append(PlannedExposure(visit=visit, next_visit_tai_mjd=announce))
        self.advance(visit.dark_time_s + READOUT_S)
        if ra is not None and dec is not None:
            self.last_radec = (ra, dec)
        if physical_filter:
            self.last_filter = physical_filter
        return visit


def _lst_deg(mjd_tai: float) -> float:
    t = Time(mjd_tai, format="mjd", scale="tai")
    return float(t.sidereal_time("mean", longitude=RUBIN_SITE.lon).deg)


def _wfd_fields(lst_deg: float, n: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Pick n WFD fields near the meridian, spaced by about one field of view (3.5°)."""
    base_dec = float(rng.uniform(-55.0, -15.0))
    fields = []
    for k in range(n):
        ra = (lst_deg - 10.0 + 3.5 * (k % 6) + float(rng.normal(0, 0.3))) % 360.0
        dec = base_dec + 3.0 * (k // 6) + float(rng.normal(0, 0.3))
        fields.append((ra, max(-88.0, min(dec, 5.0))))
    return fields


def _band_for(moon_illum: float, rng: np.random.Generator) -> str:
    """Choose a band as the survey does: blue bands when the moon is down or thin."""
    if moon_illum > 0.6:
        bands, weights = ["r", "i", "z", "y"], [0.25, 0.3, 0.25, 0.2]
    else:
        bands, weights = ["u", "g", "r", "i", "z", "y"], [0.07, 0.13, 0.25, 0.25, 0.17, 0.13]
    return str(rng.choice(bands, p=weights))


def plan_night(
    instrument: str = "LSSTCam",
    *,
    day_obs: int,
    science_visits: int,
    seed: int,
    calibrations: bool = True,
    ddf_fraction: float = 0.25,
    pair_block: int | None = None,
    conditions: ConditionsModel | None = None,
) -> NightPlan:
    """Plan one night for an instrument.

    Parameters
    ----------
    instrument
        'LSSTCam' (WFD pairs and a DDF sequence) or 'LATISS' (spectra of standard stars).
    day_obs
        Observing day, YYYYMMDD.
    science_visits
        Number of on-sky exposures to plan.
    seed
        Seed of every random choice (fields, bands); same seed, same plan.
    calibrations
        Whether to plan the afternoon calibration block.
    ddf_fraction
        Fraction of LSSTCam science visits spent in the deep-drilling sequence.
    pair_block
        Fields per WFD pair block (each observed twice, same filter); default chosen so a
        pair's revisit comes ~half an hour later on a full night, fewer on short ones.
    conditions
        Model of per-visit atmosphere and sky; None leaves conditions unset.

    Raises
    ------
    UserInputError
        Unknown instrument, impossible counts or date.
    """
    if instrument not in ("LSSTCam", "LATISS"):
        raise UserInputError(f"unknown instrument {instrument!r}; expected LSSTCam or LATISS")
    if science_visits < 0:
        raise UserInputError("science_visits must be ≥ 0")
    if not 0 <= ddf_fraction <= 1:
        raise UserInputError("ddf_fraction must be between 0 and 1")
    _validate_day_obs(day_obs)
    rng = np.random.default_rng([seed, day_obs, 0 if instrument == "LSSTCam" else 1])
    evening, morning = _twilight(day_obs)
    hours = (float(morning.tai.mjd) - float(evening.tai.mjd)) * 24
    # A visit takes at least its exposure and readout (32 s); refuse the impossible at once.
    if science_visits * (30.0 + READOUT_S) > hours * 3600:
        raise UserInputError(
            f"{science_visits} visits do not fit in the {hours:.1f} h night of {day_obs}"
        )
    calib_start = _day_obs_noon(day_obs) + timedelta(hours=7)  # 16:00 local (UTC-3) in summer
    clock = _Clock(instrument, day_obs, calib_start, conditions, seed)
    if calibrations:
        _calibration_block(clock, instrument)
    clock.mjd = max(clock.mjd, float(evening.tai.mjd))
    if instrument == "LSSTCam":
        _lsstcam_science(clock, science_visits, ddf_fraction, pair_block, rng)
    else:
        _latiss_science(clock, science_visits)
    if clock.mjd > float(morning.tai.mjd) + 1e-9 and science_visits:
        raise UserInputError(
            f"{science_visits} visits do not fit in the {hours:.1f} h night of {day_obs}"
        )
    return NightPlan(instrument=instrument, day_obs=day_obs, exposures=tuple(clock.exposures))


def _calibration_block(clock: _Clock, instrument: str) -> None:
    n_bias, n_dark, flat_bands = (5, 3, ["r", "i"]) if instrument == "LSSTCam" else (3, 2, ["r"])
    filters = LSSTCAM_FILTERS if instrument == "LSSTCam" else {"r": "SDSSr_65mm"}
    group = f"{clock.day_obs}-calib"
    for _ in range(n_bias):
        clock.take(ObsType.BIAS, "bias", f"{group}-bias", exp_time=0.0)
        clock.advance(CALIB_GAP_S)
    for _ in range(n_dark):
        clock.take(ObsType.DARK, "dark", f"{group}-dark", exp_time=30.0)
        clock.advance(CALIB_GAP_S)
    for band in flat_bands:
        for _ in range(2):
            clock.take(
                ObsType.FLAT,
                "flat",
                f"{group}-flat-{band}",
                band=band,
                physical_filter=filters[band],
                exp_time=15.0,
            )
            clock.advance(CALIB_GAP_S)


def _lsstcam_science(
    clock: _Clock,
    n: int,
    ddf_fraction: float,
    pair_block: int | None,
    rng: np.random.Generator,
) -> None:
    n_ddf = round(n * ddf_fraction) if n >= 4 else 0
    n_wfd = n - n_ddf
    # A full night revisits after ~33 min (≈ 25 fields of 39 s); a short night keeps ≥ 2 pairs.
    block = pair_block or max(1, min(25, n_wfd // 4 or 1))
    done = 0
    ddf_at = n_wfd // 2  # the DDF sequence sits in the middle of the night
    ddf_done = False
    block_no = 0
    while done < n_wfd or not ddf_done:
        if not ddf_done and done >= ddf_at:
            _ddf_sequence(clock, n_ddf, rng)
            ddf_done = True
            continue
        k = min(block, (n_wfd - done + 1) // 2) or 1
        lst = _lst_deg(clock.mjd)
        fields = _wfd_fields(lst, k, rng)
        band = _band_for(moon_illumination(clock.mjd), rng)
        group = f"{clock.day_obs}-wfd-{block_no:03d}"
        for repeat in range(2):
            for ra, dec in fields:
                if done >= n_wfd:
                    break
                clock.take(
                    ObsType.SCIENCE,
                    "wfd",
                    f"{group}-{'a' if repeat == 0 else 'b'}",
                    band=band,
                    physical_filter=LSSTCAM_FILTERS[band],
                    ra=ra,
                    dec=dec,
                    program="BLOCK-365",
                )
                done += 1
        block_no += 1


def _ddf_sequence(clock: _Clock, n: int, rng: np.random.Generator) -> None:
    if n <= 0:
        return
    # The best-placed DDF: highest now.
    name, (ra, dec) = max(DDF_FIELDS.items(), key=lambda kv: clock._altaz(*kv[1])[0])
    bands = ["g", "r", "i", "z"]
    per_band = max(1, n // len(bands))
    for k in range(n):
        band = bands[min(k // per_band, len(bands) - 1)]
        clock.take(
            ObsType.SCIENCE,
            "ddf",
            f"{clock.day_obs}-ddf-{name}",
            band=band,
            physical_filter=LSSTCAM_FILTERS[band],
            ra=ra,
            dec=dec,
            program="BLOCK-DDF",
            slew=k == 0,
        )


def _latiss_science(clock: _Clock, n: int) -> None:
    for k in range(n):
        # Observe the highest standard star.
        name, (ra, dec) = max(LATISS_STANDARDS.items(), key=lambda kv: clock._altaz(*kv[1])[0])
        clock.take(
            ObsType.SCIENCE,
            "spectrum",
            f"{clock.day_obs}-spec-{name.replace(' ', '')}",
            band="r",
            physical_filter=LATISS_DISPERSED,
            ra=ra,
            dec=dec,
            exp_time=20.0,
            program="AUXTEL-SPEC",
        )
        clock.advance(60.0 if k % 2 else 5.0)
