"""World coordinate systems of simulated detectors.

The simulated optics are distortion-free: the whole focal plane is one gnomonic (TAN)
projection about the boresight with the instrument's pixel scale, so each detector's WCS is a
TAN projection whose reference pixel is where the boresight would fall on that detector's
pixel grid (usually far outside it). That is exact for this model, with no SIP terms needed.

Orientation: ``rot_sky_deg`` is the position angle of the detector's +y axis on the sky,
measured from North through East. At 0, +y points North and +x West (East to the left, the
usual parity of a sky image).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from astropy.wcs import WCS

if TYPE_CHECKING:
    from ldf.sim.instruments import Detector, Instrument

__all__ = ["detector_wcs", "pixel_to_focal_plane", "sky_to_pixel"]


def pixel_to_focal_plane(
    instrument: Instrument, detector: Detector, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Focal-plane position (mm) of detector pixels (0-based, assembled image)."""
    pix_mm = instrument.pixel_size_um / 1000.0
    fx = detector.fp_x_mm + (np.asarray(x) - (detector.nx - 1) / 2.0) * pix_mm
    fy = detector.fp_y_mm + (np.asarray(y) - (detector.ny - 1) / 2.0) * pix_mm
    return fx, fy


def detector_wcs(
    instrument: Instrument,
    detector: Detector,
    ra_deg: float,
    dec_deg: float,
    rot_sky_deg: float = 0.0,
) -> WCS:
    """TAN WCS of one detector for a pointing.

    Parameters
    ----------
    instrument
        The camera (pixel scale and size).
    detector
        The detector (focal-plane position and pixel grid).
    ra_deg, dec_deg
        Boresight (optical axis) on the sky, degrees.
    rot_sky_deg
        Position angle of the detector +y axis, degrees East of North.

    Returns
    -------
    astropy.wcs.WCS
        Celestial WCS; pixel coordinates are those of the assembled detector image.
    """
    pix_mm = instrument.pixel_size_um / 1000.0
    # Pixel (0-based) where the optical axis (focal plane 0, 0) falls on this detector's grid.
    x_axis = (detector.nx - 1) / 2.0 - detector.fp_x_mm / pix_mm
    y_axis = (detector.ny - 1) / 2.0 - detector.fp_y_mm / pix_mm
    s = instrument.pixel_scale_arcsec / 3600.0
    th = math.radians(rot_sky_deg)
    c, n = math.cos(th), math.sin(th)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [ra_deg % 360.0, dec_deg]
    w.wcs.crpix = [x_axis + 1.0, y_axis + 1.0]  # FITS pixels are 1-based
    w.wcs.cd = np.array([[-s * c, s * n], [s * n, s * c]])
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (detector.nx, detector.ny)
    w.wcs.set()
    return w


def sky_to_pixel(w: WCS, ra_deg: np.ndarray, dec_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """0-based pixel positions of sky positions (vectorised, no distortion)."""
    if len(ra_deg) == 0:
        return np.empty(0), np.empty(0)
    x, y = w.wcs_world2pix(np.asarray(ra_deg, float), np.asarray(dec_deg, float), 0)
    return np.asarray(x), np.asarray(y)
