"""LATISS slitless spectroscopy: a standard star's zeroth order and first-order trace.

LATISS (AuxTel's imager and spectrograph) puts a grating or hologram in the converging beam,
so a star's image is a zeroth-order spot plus a first-order spectrum dispersed along the rows
(+x). The physical filter is written ``<filter>~<disperser>`` as Rubin does
(``empty~holo4_003``, ``SDSSr_65mm~empty``).

The simulated target is a hot spectrophotometric standard (a 9500 K black body with Balmer
absorption) seen through the atmosphere (O₂ A and B bands, water vapour near 935 nm), placed
at the boresight. Its spectrum is normalised so the zeroth and first orders carry fixed
fractions of the star's broadband ('white') flux.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ldf.sim.psf import MoffatPsf, add_point_sources

__all__ = [
    "DISPERSERS",
    "STANDARD_STAR_MAG",
    "Disperser",
    "add_dispersed_target",
    "parse_physical_filter",
    "trace_columns",
]

STANDARD_STAR_MAG = 10.5
"""Broadband (white) AB magnitude of the simulated spectroscopic standard."""

WAVELENGTH_RANGE_NM = (350.0, 1050.0)
"""Wavelengths the first-order trace covers."""


@dataclass(frozen=True)
class Disperser:
    """Properties of a LATISS disperser."""

    name: str
    """Rubin's name of the disperser."""
    nm_per_px: float
    """Dispersion of the first order (nm per pixel)."""
    zeroth_fraction: float
    """Fraction of the light in the zeroth order."""
    first_fraction: float
    """Fraction of the light in the first order."""


DISPERSERS = {
    "holo4_003": Disperser("holo4_003", nm_per_px=0.55, zeroth_fraction=0.10, first_fraction=0.35),
    "blue300lpmm_qn1": Disperser(
        "blue300lpmm_qn1", nm_per_px=0.90, zeroth_fraction=0.15, first_fraction=0.50
    ),
}
"""Dispersers that make a spectrum; 'empty' (no disperser) is not listed."""

# (centre nm, depth, sigma nm): Balmer lines of the star, then telluric bands.
_ABSORPTION = (
    (656.3, 0.6, 1.5),
    (486.1, 0.6, 1.5),
    (434.0, 0.5, 1.5),
    (687.0, 0.4, 1.5),
    (760.5, 0.7, 2.0),
    (935.0, 0.5, 15.0),
)


def parse_physical_filter(physical_filter: str | None) -> tuple[str, str]:
    """Split a LATISS physical filter into ``(filter, disperser)``."""
    if not physical_filter:
        return ("empty", "empty")
    filt, _, disperser = physical_filter.partition("~")
    return (filt or "empty", disperser or "empty")


def spectrum_shape(wavelength_nm: np.ndarray) -> np.ndarray:
    """Relative electrons per nm of the standard star through atmosphere and instrument."""
    lam = np.asarray(wavelength_nm, np.float64)
    lam_m = lam * 1e-9
    hc_kt = 6.62607015e-34 * 2.99792458e8 / (1.380649e-23 * 9500.0)
    planck = lam_m**-5 / np.expm1(hc_kt / lam_m)
    photons = planck * lam_m  # energy → photon counts
    throughput = np.exp(-0.5 * ((lam - 620.0) / 190.0) ** 2)
    spec = photons * throughput
    for centre, depth, sigma in _ABSORPTION:
        spec = spec * (1.0 - depth * np.exp(-0.5 * ((lam - centre) / sigma) ** 2))
    return np.asarray(spec / spec.max())


def trace_columns(x0: float, disperser: Disperser) -> tuple[float, float]:
    """First and last column of the first-order trace for a zeroth order at ``x0``."""
    lo, hi = WAVELENGTH_RANGE_NM
    return (x0 + lo / disperser.nm_per_px, x0 + hi / disperser.nm_per_px)


def add_dispersed_target(
    image: np.ndarray,
    x0: float,
    y0: float,
    psf: MoffatPsf,
    flux_e: float,
    disperser: Disperser,
) -> None:
    """Add a standard star's zeroth order and first-order trace to ``image`` (electrons).

    Parameters
    ----------
    image
        Assembled float32 image in electrons.
    x0, y0
        Position of the zeroth order (pixels).
    psf
        The PSF; its line-spread function gives the trace's cross-section.
    flux_e
        Electrons the star would give without a disperser.
    disperser
        Which disperser is in the beam.
    """
    add_point_sources(
        image, np.array([x0]), np.array([y0]), np.array([flux_e * disperser.zeroth_fraction]), psf
    )
    ny, nx = image.shape
    c_lo, c_hi = trace_columns(x0, disperser)
    c1, c2 = max(0, math.ceil(c_lo)), min(nx - 1, math.floor(c_hi))
    if c2 < c1:
        return
    lo, hi = WAVELENGTH_RANGE_NM
    grid = np.linspace(lo, hi, 2048)
    norm = float(np.trapezoid(spectrum_shape(grid), grid))
    cols = np.arange(c1, c2 + 1)
    lam = (cols - x0) * disperser.nm_per_px
    per_col = flux_e * disperser.first_fraction * spectrum_shape(lam) * disperser.nm_per_px / norm
    h = max(3, math.ceil(6.0 * psf.fwhm_px))
    r1, r2 = max(0, math.floor(y0) - h), min(ny - 1, math.ceil(y0) + h)
    if r2 < r1:
        return
    rows = np.arange(r1, r2 + 1)
    lsf = psf.line_spread(rows - y0)
    image[r1 : r2 + 1, c1 : c2 + 1] += np.outer(lsf, per_col).astype(np.float32)
