"""The atmosphere and the sky brightness during a visit, deterministic for a seed.

* Seeing (the *delivered* PSF FWHM): the atmosphere's — lognormal around 0.7″ FWHM at zenith
  and 500 nm, with a per-night level, slow variations during the night (a few incommensurate
  sinusoids) and a small per-visit jitter, scaled by ``airmass**0.6`` and ``(λ/500 nm)**-0.2``
  (Kolmogorov turbulence) — added in quadrature to the telescope's and camera's own
  :data:`SYSTEM_FWHM_ARCSEC` × ``airmass**0.6`` (Rubin's OpSim ``SeeingModel``: telescope
  0.25″, optical design 0.08″, camera 0.30″; LSST Document-20160). Without it a good night
  gave 0.34″ images, sharper than anything the telescope can deliver (and sharper than the
  cosmic-ray finder's physical floor, :data:`ldf.pipelines.isr.CR_MIN_PSF_FWHM_ARCSEC`).
* Sky brightness: dark-sky zenith values per band, brighter with airmass, plus scattered
  moonlight from the Krisciunas & Schaefer (1991, PASP 103, 1033) model with a rough per-band
  colour of moonlight.
* Transparency: most nights photometric; some are cloudy with variable extinction.
* Moon and Sun: astropy's ephemerides for Rubin's site (`RUBIN_SITE`).
"""

from __future__ import annotations

import math

import numpy as np
from astropy import units as u
from astropy.coordinates import AltAz, EarthLocation, SkyCoord, get_body, get_sun
from astropy.time import Time
from astropy.utils import iers

from ldf.errors import UserInputError
from ldf.sim.models import ObservingConditions

__all__ = [
    "BAND_WAVELENGTH_NM",
    "DARK_SKY_MAG",
    "RUBIN_LATITUDE_DEG",
    "RUBIN_LONGITUDE_DEG",
    "RUBIN_SITE",
    "SYSTEM_FWHM_ARCSEC",
    "conditions_for",
    "moon_illumination",
    "moon_radec",
    "night_of",
    "sky_altitude",
]

BAND_WAVELENGTH_NM = {
    "u": 368.0,
    "g": 480.0,
    "r": 622.0,
    "i": 754.0,
    "z": 869.0,
    "y": 971.0,
    "white": 650.0,
}
"""Effective wavelength of each band (nm); 'white' is LATISS's open filter."""

DARK_SKY_MAG = {"u": 22.9, "g": 22.3, "r": 21.2, "i": 20.5, "z": 19.6, "y": 18.6, "white": 21.0}
"""Dark-sky zenith brightness, AB mag/arcsec²."""

_MOON_COLOUR = {"u": 0.9, "g": 0.1, "r": -0.2, "i": -0.3, "z": -0.3, "y": -0.3, "white": -0.1}
# Moonlit sky colour relative to V (AB mag): solar spectrum made bluer by Rayleigh scattering.

# The bundled IERS tables are enough for a simulator's sky; never try the network, and use
# their predictions however old (an offline machine cannot refresh them; a simulator's
# sidereal time does not need sub-second UT1).
iers.conf.auto_download = False
iers.conf.auto_max_age = None

RUBIN_LATITUDE_DEG = -30.244639
"""Latitude of Cerro Pachón."""
RUBIN_LONGITUDE_DEG = -70.749417
"""East longitude of Cerro Pachón."""
RUBIN_SITE = EarthLocation.from_geodetic(
    RUBIN_LONGITUDE_DEG * u.deg, RUBIN_LATITUDE_DEG * u.deg, 2663 * u.m
)
"""Simonyi Survey Telescope, Cerro Pachón."""

_MEDIAN_SEEING_ARCSEC = 0.7
_SIGMA_LN_NIGHT = 0.2
_SIGMA_LN_HOURS = 0.12
_SIGMA_LN_VISIT = 0.04
_CLOUDY_NIGHT_FRACTION = 0.25
_SKY_JITTER_MAG = 0.05
SYSTEM_FWHM_ARCSEC = 0.4
"""The telescope's and camera's contribution to the delivered FWHM at zenith (arcsec): Rubin's
OpSim ``SeeingModel`` adds telescope 0.25″, optical design 0.08″ and camera 0.30″ in
quadrature (0.399″) and scales the sum with ``airmass**0.6`` like the atmosphere's."""
_POINTING_RMS_ARCSEC = 2.0
"""Rms per axis of the mount's blind pointing error (Rubin's requirement is 2″ after a slew)."""


def night_of(mjd: float) -> int:
    """Integer night key of an MJD: the day_obs convention (UTC − 12 h) as an MJD day."""
    return math.floor(mjd - 0.5)


def _time(mjd: float) -> Time:
    return Time(mjd, format="mjd", scale="tai")


def moon_radec(mjd: float) -> tuple[float, float]:
    """Apparent RA, Dec of the Moon seen from Cerro Pachón (degrees)."""
    moon = get_body("moon", _time(mjd), RUBIN_SITE)
    return float(moon.ra.deg), float(moon.dec.deg)


def moon_illumination(mjd: float) -> float:
    """Illuminated fraction of the Moon's disc (0 new, 1 full), from its elongation."""
    t = _time(mjd)
    elongation = get_sun(t).separation(get_body("moon", t)).rad
    return float((1.0 - math.cos(elongation)) / 2.0)


def sky_altitude(ra_deg: float, dec_deg: float, mjd: float) -> float:
    """Altitude (degrees) of a sky position seen from Cerro Pachón at ``mjd`` (TAI)."""
    frame = AltAz(obstime=_time(mjd), location=RUBIN_SITE)
    return float(SkyCoord(ra=ra_deg * u.deg, dec=dec_deg * u.deg).transform_to(frame).alt.deg)


def _separation_deg(ra1: float, dec1: float, ra2: float, dec2: float) -> float:
    return float(
        SkyCoord(ra1 * u.deg, dec1 * u.deg).separation(SkyCoord(ra2 * u.deg, dec2 * u.deg)).deg
    )


def _moon_sky_nl(
    illumination: float, moon_alt: float, target_alt: float, separation: float
) -> float:
    """Scattered moonlight in V, nanoLamberts (Krisciunas & Schaefer 1991, eqs. 15-21)."""
    if moon_alt <= 0.0 or target_alt <= 0.0:
        return 0.0
    k_v = 0.172  # V-band extinction, mag/airmass
    phase = math.degrees(math.acos(max(-1.0, min(1.0, 2.0 * illumination - 1.0))))
    i_star = 10.0 ** (-0.4 * (3.84 + 0.026 * phase + 4e-9 * phase**4))
    rho = max(separation, 2.0)
    f_rho = 10**5.36 * (1.06 + math.cos(math.radians(rho)) ** 2) + 10 ** (6.15 - rho / 40.0)

    def x(alt: float) -> float:
        z = math.radians(90.0 - alt)
        return (1.0 - 0.96 * math.sin(z) ** 2) ** -0.5

    return (
        f_rho * i_star * 10 ** (-0.4 * k_v * x(moon_alt)) * (1 - 10 ** (-0.4 * k_v * x(target_alt)))
    )


def _mag_to_nl(mag: float) -> float:
    return 34.08 * math.exp(20.7233 - 0.92104 * mag)


def _nl_to_mag(nl: float) -> float:
    return (20.7233 - math.log(nl / 34.08)) / 0.92104


def conditions_for(
    seed: int,
    mjd: float,
    band: str,
    airmass: float = 1.0,
    *,
    ra_deg: float | None = None,
    dec_deg: float | None = None,
) -> ObservingConditions:
    """Observing conditions of one visit.

    Parameters
    ----------
    seed
        The night simulation's seed: the same seed gives the same weather.
    mjd
        Time of the visit (TAI MJD; UT is close enough for the sky).
    band
        Abstract filter, ugrizy (or LATISS's 'white').
    airmass
        Airmass of the pointing (≥ 1).
    ra_deg, dec_deg
        Pointing, for the angular distance to the Moon; without it the Moon is taken to be
        90° away.

    Raises
    ------
    UserInputError
        Unknown band or airmass below 1.
    """
    if band not in BAND_WAVELENGTH_NM:
        raise UserInputError(f"unknown band {band!r}; expected one of ugrizy")
    if not airmass >= 1.0:
        raise UserInputError(f"airmass must be ≥ 1, got {airmass}")
    night = night_of(mjd)
    nrng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 7, night])))
    night_ln = float(nrng.normal(0.0, _SIGMA_LN_NIGHT))
    periods_h = nrng.uniform(1.0, 6.0, size=3)
    phases = nrng.uniform(0.0, 2 * math.pi, size=3)
    cloudy = bool(nrng.random() < _CLOUDY_NIGHT_FRACTION)
    cloud_depth = float(nrng.uniform(0.05, 0.6))
    cloud_period_h = float(nrng.uniform(0.3, 2.0))
    cloud_phase = float(nrng.uniform(0.0, 2 * math.pi))
    sky_offset = float(nrng.normal(0.0, 0.1))

    vrng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence([seed, 8, round(mjd * 86400.0)]))
    )
    hours = (mjd - night) * 24.0
    slow = float(np.sum(np.sin(2 * math.pi * hours / periods_h + phases))) / math.sqrt(1.5)
    ln_seeing = (
        math.log(_MEDIAN_SEEING_ARCSEC)
        + night_ln
        + _SIGMA_LN_HOURS * slow
        + float(vrng.normal(0.0, _SIGMA_LN_VISIT))
    )
    wavelength = BAND_WAVELENGTH_NM[band]
    atmosphere = math.exp(ln_seeing) * (wavelength / 500.0) ** -0.2
    seeing = math.hypot(atmosphere, SYSTEM_FWHM_ARCSEC) * airmass**0.6

    if cloudy:
        wave = 0.5 * (1.0 + math.sin(2 * math.pi * hours / cloud_period_h + cloud_phase))
        transparency = 1.0 - cloud_depth * wave * float(vrng.uniform(0.7, 1.0))
    else:
        transparency = 1.0 - float(vrng.uniform(0.0, 0.02))
    transparency = min(1.0, max(0.05, transparency))

    # Sky: dark sky brightens with airmass (more airglow along the line of sight, roughly
    # 2.5 log10 X), then moonlight is added in linear units.
    illum = moon_illumination(mjd)
    mra, mdec = moon_radec(mjd)
    moon_alt = sky_altitude(mra, mdec, mjd)
    target_alt = math.degrees(math.asin(min(1.0, 1.0 / airmass)))
    separation = (
        90.0 if ra_deg is None or dec_deg is None else _separation_deg(ra_deg, dec_deg, mra, mdec)
    )
    dark = DARK_SKY_MAG[band] - 2.5 * math.log10(airmass) + sky_offset
    dark += float(vrng.normal(0.0, _SKY_JITTER_MAG))
    moon_nl = _moon_sky_nl(illum, moon_alt, target_alt, separation)
    sky_nl = _mag_to_nl(dark) + moon_nl * 10 ** (-0.4 * _MOON_COLOUR[band])
    sky_mag = _nl_to_mag(sky_nl)

    e1, e2 = (float(v) for v in vrng.normal(0.0, 0.02, size=2))
    # Pointing error of the mount (drawn after everything else so older draws keep their values).
    dra, ddec = (float(v) for v in vrng.normal(0.0, _POINTING_RMS_ARCSEC, size=2))
    return ObservingConditions(
        seeing_fwhm_arcsec=round(seeing, 4),
        sky_mag_arcsec2=round(sky_mag, 4),
        transparency=round(transparency, 4),
        moon_illumination=round(illum, 4),
        moon_alt_deg=round(moon_alt, 3),
        psf_e1=round(e1, 4),
        psf_e2=round(e2, 4),
        pointing_dra_arcsec=round(dra, 3),
        pointing_ddec_arcsec=round(ddec, 3),
    )
