"""Camera physics: one detector's raw amplifier images for one visit, with truth.

:func:`render_detector` builds the expected electrons of the assembled CCD (sky, stars,
transients, variables, flat-field response, dark current, hot pixels, cosmic rays, saturation
with bleed trails), then reads each amplifier out: noise, gain, bias level and bias structure,
prescan and overscans, readout flips, 18-bit ADC, int32. :func:`assemble` inverts the readout
(overscan, gain, flips) so tests and ISR can look at the image in electrons.

Photometric model (documented constants)
    Zero points (AB mag giving 1 e-/s at airmass 1) and extinction per band come from the
    instrument (after Rubin's SMTN-002 for an 8.4 m-class mirror of 6.4 m effective
    diameter: u 26.52, g 28.51, r 28.36, i 28.17, z 27.78, y 26.82). A source of magnitude m
    gives ``10^(-0.4 (m - ZP)) · t · T · 10^(-0.4 k (X - 1))`` electrons (T transparency, X
    airmass). The sky's surface brightness is as seen from the ground, so its counts per
    pixel are ``10^(-0.4 (μ - ZP - k)) · p² · t`` (p pixel scale).

Noise
    Shot noise uses the Gaussian approximation to Poisson, ``σ² = S + RN²``, with one normal
    draw per pixel: per-pixel signals are either large (sky of hundreds of e-) or dominated by
    read noise (biases, darks), and drawing Poisson variates is ~10× slower.

Determinism
    Everything random for a readout comes from
    ``SeedSequence([seed, exposure_id, detector.id])`` (SFC64, the fastest numpy bit
    generator); hardware properties (electronics, flat pattern, hot pixels, bias structure)
    come from :func:`ldf.sim.instruments.hardware_rng` and are the same every night.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from ldf.errors import UserInputError
from ldf.sim import latiss
from ldf.sim.conditions import conditions_for
from ldf.sim.instruments import ADC_MAX, hardware_rng
from ldf.sim.models import ObservingConditions, ObsType, TruthKind, TruthRow, VisitSpec
from ldf.sim.psf import MoffatPsf, add_point_sources
from ldf.sim.sky import KIND_PERIODIC, Sky, light_curve_mag, star_mags
from ldf.sim.wcs import detector_wcs, pixel_to_focal_plane, sky_to_pixel

if TYPE_CHECKING:
    from astropy.wcs import WCS

    from ldf.sim.instruments import Amplifier, Detector, Instrument

__all__ = [
    "COSMIC_RAY_RATE_CM2_S",
    "FLAT_RATE_E_PER_S",
    "DetectorReadout",
    "apply_saturation",
    "assemble",
    "flat_pattern",
    "render_detector",
    "true_pointing",
]

FLAT_RATE_E_PER_S = 5000.0
"""Flat-field screen illumination, electrons per second per pixel (before the flat pattern)."""
COSMIC_RAY_RATE_CM2_S = 1.5
"""Cosmic rays per cm² per second of dark time."""
HOT_PIXEL_FRACTION = 2e-5
"""Fraction of pixels that are hot (hardware property)."""
_VIGNETTING_DEPTH = 0.15
_AMP_QE_SIGMA = 0.02
_PRNU_RMS = 0.005
_ROW_NOISE_ADU = 0.5
_COLUMN_PATTERN_ADU = 0.3
_BIAS_RAMP_ADU = 2.0
_MARGIN_PX = 40


@dataclass
class DetectorReadout:
    """Raw pixels of one detector in one visit, and what was put there."""

    detector: str
    """Detector name, e.g. 'R22_S11'."""
    amps: dict[str, np.ndarray]
    """Raw int32 image per amplifier (readout order, prescan and overscans included)."""
    truth: list[TruthRow]
    """Injected transients and variables on this detector; ``flux_e`` is what the detector
    records: after extinction, transparency and the flat-field response at the source."""
    wcs: WCS | None
    """Sky WCS of the assembled image (None for closed-dome exposures)."""
    conditions: ObservingConditions | None = None
    """Conditions used for the exposure (None for closed-dome exposures)."""


def _visit_rngs(seed: int, visit: VisitSpec, detector: Detector) -> list[np.random.Generator]:
    ss = np.random.SeedSequence([seed, visit.exposure_id, detector.id])
    # Separate streams so, e.g., a different number of cosmic rays never shifts the noise.
    return [np.random.Generator(np.random.SFC64(s)) for s in ss.spawn(3)]


@lru_cache(maxsize=4)
def _flat_pattern_cached(instrument: Instrument, det_id: int) -> np.ndarray:
    detector = instrument.detector_by_id(det_id)
    fx, fy = pixel_to_focal_plane(
        instrument, detector, np.arange(detector.nx), np.arange(detector.ny)
    )
    inv_r2 = 1.0 / instrument.vignetting_radius_mm**2
    fx2 = (np.asarray(fx) ** 2 * inv_r2).astype(np.float32)
    fy2 = (np.asarray(fy) ** 2 * inv_r2).astype(np.float32)
    rng = hardware_rng(instrument.name, detector.id, 0, 3)
    # PRNU: uniform with the stated rms, then × vignetting, in row chunks so the
    # temporaries stay small (fresh 65 MB arrays cost more in page faults than in arithmetic).
    flat = rng.random((detector.ny, detector.nx), dtype=np.float32)
    flat -= np.float32(0.5)
    flat *= np.float32(_PRNU_RMS * math.sqrt(12.0))
    flat += np.float32(1.0)
    step = 256
    for r0 in range(0, detector.ny, step):
        u = fy2[r0 : r0 + step, None] + fx2[None, :]
        np.square(u, out=u)
        u *= np.float32(-_VIGNETTING_DEPTH)
        u += np.float32(1.0)
        flat[r0 : r0 + step] *= u
    for amp in detector.amplifiers:
        qe = 1.0 + _AMP_QE_SIGMA * hardware_rng(instrument.name, detector.id, amp.index, 4).normal()
        flat[amp.assembled_slice()] *= np.float32(qe)
    flat.flags.writeable = False
    return flat


def flat_pattern(instrument: Instrument, detector: Detector) -> np.ndarray:
    """Relative response of each pixel (read-only float32, assembled image).

    Smooth vignetting ``1 − 0.15 (r/R)^4`` with r the focal-plane radius, per-amplifier QE
    (2 % rms) and pixel response non-uniformity (0.5 % rms); fixed hardware properties.
    """
    return _flat_pattern_cached(instrument, detector.id)


def _add_dark(
    image: np.ndarray,
    instrument: Instrument,
    detector: Detector,
    dark_time: float,
    rng: np.random.Generator,
) -> None:
    if dark_time <= 0.0:
        return
    for amp in detector.amplifiers:
        image[amp.assembled_slice()] += np.float32(amp.dark_current * dark_time)
    hrng = hardware_rng(instrument.name, detector.id, 0, 5)
    n_hot = int(HOT_PIXEL_FRACTION * detector.nx * detector.ny) + 1
    idx = hrng.integers(0, detector.nx * detector.ny, n_hot)
    rates = hrng.lognormal(math.log(1.0), 1.0, n_hot)  # e-/s, a few up to tens
    np.add.at(image.reshape(-1), idx, (rates * dark_time).astype(np.float32))
    _add_cosmic_rays(image, instrument, dark_time, rng)


def _add_cosmic_rays(
    image: np.ndarray, instrument: Instrument, dark_time: float, rng: np.random.Generator
) -> None:
    ny, nx = image.shape
    pix_cm = instrument.pixel_size_um * 1e-4
    n = int(rng.poisson(COSMIC_RAY_RATE_CM2_S * nx * ny * pix_cm * pix_cm * dark_time))
    if n == 0:
        return
    # Muons: zenith angle ~ cos², 100 µm of silicon (10 px), ~80 e-/µm with Landau-like
    # (lognormal) fluctuations; the projected track is thickness × tan(θ) long.
    theta = np.arccos(np.sqrt(rng.random(n)))
    length = np.minimum(10.0 * np.tan(theta), 80.0)
    total = 8000.0 / np.maximum(np.cos(theta), 0.12) * rng.lognormal(0.0, 0.3, n)
    phi = rng.uniform(0.0, 2 * math.pi, n)
    x0, y0 = rng.uniform(0, nx, n), rng.uniform(0, ny, n)
    steps = np.maximum(1, np.ceil(length * 2).astype(np.int64))
    track = np.repeat(np.arange(n), steps)
    first = np.cumsum(steps) - steps
    frac = (np.arange(track.size) - first[track] + 0.5) / steps[track]
    xs = np.rint(x0[track] + frac * length[track] * np.cos(phi[track])).astype(np.int64)
    ys = np.rint(y0[track] + frac * length[track] * np.sin(phi[track])).astype(np.int64)
    e = (total / steps)[track].astype(np.float32)
    ok = (xs >= 0) & (xs < nx) & (ys >= 0) & (ys < ny)
    np.add.at(image.reshape(-1), ys[ok] * nx + xs[ok], e[ok])


def _spill(segment: np.ndarray, amount: float, full_well: float) -> None:
    """Fill ``segment`` pixel by pixel up to the full well with ``amount`` electrons."""
    if amount <= 0.0 or segment.size == 0:
        return
    room = np.cumsum(np.maximum(full_well - segment, 0.0), dtype=np.float64)
    k = int(np.searchsorted(room, amount))
    segment[:k] = full_well
    if k < segment.size:
        segment[k] += amount - (room[k - 1] if k > 0 else 0.0)


def apply_saturation(image: np.ndarray, detector: Detector) -> None:
    """Clip pixels at their amplifier's full well, in place, with bleed trails.

    The charge above the full well spills along the column (the parallel direction), half
    up and half down, filling pixels to the full well; charge that would leave the
    amplifier's data section is lost.
    """
    if float(image.max()) <= min(a.full_well for a in detector.amplifiers):
        return
    for amp in detector.amplifiers:
        data = image[amp.assembled_slice()]
        fw = float(amp.full_well)
        over = data > fw
        if not over.any():
            continue
        for col in np.flatnonzero(over.any(axis=0)):
            column = data[:, col]
            rows = np.flatnonzero(column > fw)
            excess = float(np.sum(column[rows] - fw, dtype=np.float64))
            column[rows] = fw
            _spill(column[rows[-1] + 1 :], excess / 2, fw)
            _spill(column[: rows[0]][::-1], excess / 2, fw)


def true_pointing(
    ra_deg: float, dec_deg: float, cond: ObservingConditions | None
) -> tuple[float, float]:
    """Where the telescope really pointed: the commanded boresight plus the pointing error."""
    if cond is None:
        return ra_deg, dec_deg
    dec = dec_deg + cond.pointing_ddec_arcsec / 3600.0
    cos_dec = max(math.cos(math.radians(dec_deg)), 1e-6)
    ra = (ra_deg + cond.pointing_dra_arcsec / 3600.0 / cos_dec) % 360.0
    return ra, max(-90.0, min(90.0, dec))


def _psf_for(instrument: Instrument, cond: ObservingConditions) -> MoffatPsf:
    return MoffatPsf(
        fwhm_px=cond.seeing_fwhm_arcsec / instrument.pixel_scale_arcsec,
        e1=cond.psf_e1,
        e2=cond.psf_e2,
    )


def _render_sky(
    image: np.ndarray,
    instrument: Instrument,
    detector: Detector,
    visit: VisitSpec,
    sky: Sky,
    seed: int,
) -> tuple[list[TruthRow], WCS, ObservingConditions]:
    band = visit.band
    assert band is not None
    if band not in instrument.zero_points:
        raise UserInputError(f"{instrument.name} has no zero point for band {band!r}")
    mjd_mid = visit.start_tai_mjd + visit.exp_time_s / 2.0 / 86400.0
    cond = visit.conditions or conditions_for(
        seed, mjd_mid, band, visit.airmass, ra_deg=visit.ra_deg, dec_deg=visit.dec_deg
    )
    zp, k = instrument.zero_points[band], instrument.extinction[band]
    t = visit.exp_time_s
    e_mag0 = 10 ** (0.4 * zp) * t * cond.transparency * 10 ** (-0.4 * k * (visit.airmass - 1.0))
    sky_e = 10 ** (-0.4 * (cond.sky_mag_arcsec2 - zp - k)) * instrument.pixel_scale_arcsec**2 * t
    image.fill(np.float32(sky_e))

    ra_true, dec_true = true_pointing(visit.ra_deg, visit.dec_deg, cond)
    wcs = detector_wcs(instrument, detector, ra_true, dec_true, visit.rot_sky_deg)
    psf = _psf_for(instrument, cond)
    cx, cy = (detector.nx - 1) / 2.0, (detector.ny - 1) / 2.0
    ra_c, dec_c = (float(v) for v in wcs.wcs_pix2world(cx, cy, 0))
    radius = (
        math.hypot(detector.nx / 2 + _MARGIN_PX, detector.ny / 2 + _MARGIN_PX)
        * instrument.pixel_scale_arcsec
        / 3600.0
    )

    stars = sky.stars(ra_c, dec_c, radius)
    if len(stars):
        xs, ys = sky_to_pixel(wcs, stars["ra"], stars["dec"])
        add_point_sources(image, xs, ys, e_mag0 * 10 ** (-0.4 * star_mags(stars, band)), psf)

    injected = sky.injected(ra_c, dec_c, radius, mjd_mid)
    truth: list[TruthRow] = []
    flat = flat_pattern(instrument, detector)
    if len(injected):
        mags = light_curve_mag(injected, band, mjd_mid)
        shining = np.isfinite(mags)
        injected, mags = injected[shining], mags[shining]
        xs, ys = sky_to_pixel(wcs, injected["ra"], injected["dec"])
        fluxes = e_mag0 * 10 ** (-0.4 * mags)
        add_point_sources(image, xs, ys, fluxes, psf)
        on = (xs >= -0.5) & (xs < detector.nx - 0.5) & (ys >= -0.5) & (ys < detector.ny - 0.5)
        for src, x, y, mag, flux in zip(
            injected[on], xs[on], ys[on], mags[on], fluxes[on], strict=True
        ):
            response = float(flat[round(y), round(x)])
            truth.append(
                TruthRow(
                    exposure_id=visit.exposure_id,
                    detector=detector.name,
                    kind=TruthKind.VARIABLE
                    if src["kind"] == KIND_PERIODIC
                    else TruthKind.TRANSIENT,
                    source_id=int(src["source_id"]),
                    ra_deg=float(src["ra"]),
                    dec_deg=float(src["dec"]),
                    x=float(x),
                    y=float(y),
                    mag=float(mag),
                    flux_e=float(flux) * response,
                    mjd=mjd_mid,
                )
            )

    _, disperser = latiss.parse_physical_filter(visit.physical_filter)
    if instrument.name == "LATISS" and disperser in latiss.DISPERSERS:
        x0, y0 = (float(v) for v in wcs.wcs_world2pix(visit.ra_deg, visit.dec_deg, 0))
        latiss.add_dispersed_target(
            image,
            x0,
            y0,
            psf,
            e_mag0 * 10 ** (-0.4 * latiss.STANDARD_STAR_MAG),
            latiss.DISPERSERS[disperser],
        )
    image *= flat
    return truth, wcs, cond


def _read_out(
    image: np.ndarray | None, detector: Detector, rng: np.random.Generator, instrument: str
) -> dict[str, np.ndarray]:
    amps: dict[str, np.ndarray] = {}
    # Scratch buffers reused for every amplifier (all amplifiers of a CCD have one shape).
    raw = np.empty(detector.amplifiers[0].raw_shape, np.float32)
    tmp = np.empty((detector.amplifiers[0].ny, detector.amplifiers[0].nx), np.float32)
    for amp in detector.amplifiers:
        rows = amp.raw_shape[0]
        rng.standard_normal(out=raw, dtype=np.float32)
        raw *= np.float32(amp.read_noise / amp.gain)
        if image is not None:
            sig = image[amp.assembled_slice()]
            if amp.flip_x:
                sig = sig[:, ::-1]
            if amp.flip_y:
                sig = sig[::-1, :]
            data = raw[amp.raw_data_slice]
            # σ = sqrt(S + RN²)/gain = (RN/gain)·sqrt(1 + S/RN²): rescale the read-noise draw.
            np.multiply(sig, np.float32(1.0 / amp.read_noise**2), out=tmp)
            tmp += np.float32(1.0)
            np.sqrt(tmp, out=tmp)
            data *= tmp
            np.multiply(sig, np.float32(1.0 / amp.gain), out=tmp)
            data += tmp
            np.minimum(data, np.float32(amp.saturation), out=data)
        raw += _bias_structure(instrument, detector, amp)[None, :]
        raw += (amp.bias_level + _ROW_NOISE_ADU * rng.standard_normal(rows)).astype(np.float32)[
            :, None
        ]
        np.rint(raw, out=raw)
        np.clip(raw, 0, ADC_MAX, out=raw)
        amps[amp.name] = raw.astype(np.int32)
    return amps


@lru_cache(maxsize=4096)
def _bias_structure(instrument: str, detector: Detector, amp: Amplifier) -> np.ndarray:
    """Fixed column pattern of an amplifier (ADU, readout order): a ramp at the start of
    each row plus small column-to-column offsets."""
    cols = amp.raw_shape[1]
    rng = hardware_rng(instrument, detector.id, amp.index, 6)
    pattern = _COLUMN_PATTERN_ADU * rng.standard_normal(cols)
    pattern += _BIAS_RAMP_ADU * np.exp(-np.arange(cols) / 8.0)
    out = pattern.astype(np.float32)
    out.flags.writeable = False
    return out


def render_detector(
    instrument: Instrument,
    detector: Detector,
    visit: VisitSpec,
    sky: Sky,
    *,
    seed: int,
) -> DetectorReadout:
    """Simulate the raw readout of one detector for one visit.

    Parameters
    ----------
    instrument
        The camera (from :func:`ldf.sim.instruments.get_instrument`).
    detector
        One of the instrument's detectors.
    visit
        What is exposed: type, pointing, band, times, conditions.
    sky
        The simulated sky (stars, transients, variables).
    seed
        The night's seed; the output is byte-identical for the same
        (seed, visit.exposure_id, detector).

    Returns
    -------
    DetectorReadout
        Raw int32 amplifier images, truth rows for injected sources on the detector, and
        the WCS and conditions of on-sky exposures.

    Raises
    ------
    UserInputError
        The visit is for another instrument, or its band is unknown to the instrument.
    """
    if visit.instrument != instrument.name:
        raise UserInputError(
            f"visit {visit.obs_id} is for {visit.instrument}, not {instrument.name}"
        )
    noise_rng, event_rng, _ = _visit_rngs(seed, visit, detector)
    obs = visit.obs_type
    on_sky = obs is ObsType.SCIENCE or (
        obs is ObsType.ENGTEST and visit.band is not None and visit.exp_time_s > 0
    )
    truth: list[TruthRow] = []
    wcs: WCS | None = None
    cond: ObservingConditions | None = None
    image: np.ndarray | None = None
    if obs is not ObsType.BIAS:
        image = np.zeros((detector.ny, detector.nx), np.float32)
        if on_sky and visit.band is not None:
            truth, wcs, cond = _render_sky(image, instrument, detector, visit, sky, seed)
        elif obs is ObsType.FLAT:
            image += flat_pattern(instrument, detector)
            image *= np.float32(FLAT_RATE_E_PER_S * visit.exp_time_s)
        _add_dark(image, instrument, detector, visit.dark_time_s, event_rng)
        apply_saturation(image, detector)
    return DetectorReadout(
        detector=detector.name,
        amps=_read_out(image, detector, noise_rng, instrument.name),
        truth=truth,
        wcs=wcs,
        conditions=cond,
    )


def assemble(detector: Detector, amps: dict[str, np.ndarray]) -> np.ndarray:
    """Assembled detector image in electrons from raw amplifier images.

    Subtracts, row by row, the median of the serial overscan, multiplies by the gain and
    undoes the readout flips. No bias frame, dark or flat correction (that is ISR's job).

    Returns
    -------
    numpy.ndarray
        float32 array of shape ``(detector.ny, detector.nx)``.
    """
    out = np.empty((detector.ny, detector.nx), np.float32)
    for amp in detector.amplifiers:
        raw = amps[amp.name]
        overscan = np.median(raw[amp.raw_serial_overscan_slice], axis=1).astype(np.float32)
        data = raw[amp.raw_data_slice].astype(np.float32)
        data -= overscan[:, None]
        data *= np.float32(amp.gain)
        if amp.flip_x:
            data = data[:, ::-1]
        if amp.flip_y:
            data = data[::-1, :]
        out[amp.assembled_slice()] = data
    return out
