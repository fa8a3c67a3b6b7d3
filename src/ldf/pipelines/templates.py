"""Templates for difference imaging: a skymap of tangent-plane patches, coadds, and their store.

Skymap
    The sky is cut into declination rings ``patch_deg`` high (0.3° by default, ring centres at
    ``dec = −90° + i·patch_deg``, one round cap at each pole), each ring into RA cells at most
    ``patch_deg`` wide at its equator-side edge. Each cell is the *inner region* of one patch;
    inner regions tile the sky without overlap. A patch is a north-up, East-left gnomonic (TAN)
    pixel grid at ``pixel_scale_arcsec`` (0.2″) centred on its cell, large enough to hold the
    cell's projected outline plus ``overlap_arcsec`` (50″) on every side, so neighbouring patches
    overlap and any 256-pixel block of a detector whose centre lies in a cell lies wholly inside
    that cell's patch. This is the layout of Rubin's ``skymap`` (tracts and patches with inner
    and outer boxes), flattened to one level.

Coadd (:func:`build_template`)
    Each input is a calibrated, background-subtracted :class:`~ldf.pipelines.types.Exposure`
    (WCS, PSF and zero point set). It is scaled to nJy per pixel, resampled onto the patch grid
    and the inputs are combined per pixel with a clipped, inverse-variance weighted mean, as
    Rubin's ``assembleCoadd`` does:

    * **Resampling**: quintic B-spline interpolation (``scipy.ndimage``, order 5) on 256-pixel
      blocks, each with the exact affine approximation of the WCS-to-WCS mapping (TAN to TAN is
      a homography; over 256 pixels its curvature is < 10⁻³ pixel). Interpolating splines are
      used rather than bilinear interpolation because bilinear interpolation smooths by a
      phase-dependent amount — up to 0.25 px² of added PSF variance at half-pixel phase, which
      a rotated input turns into a moiré of PSF sizes across the coadd that no constant
      matching kernel can follow. A quintic spline reproduces a 0.65″ PSF to 0.1 % of its peak
      at any phase (cubic: 0.65 %, comparable to Rubin's Lanczos3); it is the choice for the
      offline coadd, where time matters less than in prompt processing's warp (cubic there).
    * **Weights**: one scalar per input, the inverse of its median variance — per-pixel
      inverse-variance weights would bias bright stars low, because the variance contains each
      star's own photon noise.
    * **Outlier rejection**: with ≥ 3 inputs at a pixel, an input is rejected where it differs
      from the median by more than ``clip_sigma`` times its noise (plus ``clip_fraction`` of the
      median, for the PSF differences between inputs in star cores), so cosmic rays, satellite
      trails and transients present in one input vanish. Two inputs that disagree cannot be
      told apart (the "lower" one is often the negative interpolation ringing of a cosmic ray
      in the other): the pixel gets no data. A pixel needs ``min_inputs`` (2) inputs left;
      fewer is ``NO_DATA`` — one input cannot be cleaned, and a cosmic ray in the template,
      convolved with the matching kernel, looks like a negative point source. Pixels masked
      ``BAD``, ``SAT``, ``CR`` or ``NO_DATA`` in an input do not contribute (``SAT`` is kept in
      the coadd's mask where every input was saturated). ``SUSPECT`` marks pixels that had
      fewer than 3 inputs (no median to clip against).
    * **PSF**: the weighted mean of the inputs' PSF images, each resampled into the patch frame
      by the local linear part of its mapping (one PSF per patch, like a spatially constant
      ``CoaddPsf``).

Store (:class:`TemplateStore`)
    One FITS file per (band, patch), written atomically (temporary file + ``os.replace``). Only
    the patch's covered bounding box is stored (its origin in the patch grid is in the header).
    Besides image, variance, mask, depth and PSF, the file carries what prompt processing's
    warp onto a detector (:meth:`TemplateStore.warp_to`) needs ready-made: the image's cubic
    B-spline coefficients (skipping the spline prefilter, 0.2–0.4 s per full-size detector)
    and 4×4-binned variance (mean) and mask (OR). The warp reads memory-mapped crops and runs
    cubic-spline resampling per block for the image, nearest-neighbour on the binned planes for
    variance and mask (the template's variance is smooth and far below the science's; the mask
    comes out grown by up to 3 pixels, conservatively).

Units
    Template images are calibrated surface brightness in **nJy per pixel**; variance in nJy².
    The exposure :meth:`TemplateStore.warp_to` returns is in nJy too: its ``zero_point`` is
    31.4 (``AB_NJY_ZERO_POINT``) with an exposure time of 1 s, so ``njy_per_electron()`` is 1.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.ndimage as ndi
from astropy.io import fits
from astropy.wcs import WCS

from ldf.errors import NotFoundError
from ldf.pipelines.types import (
    AB_NJY_ZERO_POINT,
    DetectorError,
    Exposure,
    Mask,
    PsfModel,
    VisitInfo,
)

__all__ = [
    "BLOCK_PX",
    "PatchId",
    "SkyMap",
    "Template",
    "TemplateStore",
    "build_template",
    "pixel_mapping_blocks",
]

BLOCK_PX = 256
"""Side of the blocks resampled with one affine transform each (pixels)."""

_INPUT_REJECT = np.uint16(Mask.BAD | Mask.SAT | Mask.CR | Mask.NO_DATA)
"""Input pixels that never enter a coadd."""
_BIN = 4
"""Binning of variance and mask in :meth:`TemplateStore.warp_to`."""
_FITS_VERSION = 1


class PatchId(NamedTuple):
    """A patch of the :class:`SkyMap`: declination ring and RA cell within it."""

    ring: int
    cell: int

    def __str__(self) -> str:
        return f"{self.ring}.{self.cell}"

    @classmethod
    def parse(cls, text: str) -> PatchId:
        """Parse ``'ring.cell'`` (as :meth:`__str__` writes it)."""
        try:
            ring, cell = text.split(".")
            return cls(int(ring), int(cell))
        except ValueError:
            raise ValueError(f"not a patch id: {text!r} (expected 'ring.cell')") from None


@dataclass(frozen=True)
class SkyMap:
    """Fixed tangent-plane patches covering the sky (see the module docstring).

    Parameters
    ----------
    patch_deg
        Height of the declination rings and largest width of a patch's inner region (degrees);
        180 / patch_deg must be an integer.
    overlap_arcsec
        Margin of every patch beyond its inner region (arcsec).
    pixel_scale_arcsec
        Pixel scale of the patch grids.
    """

    patch_deg: float = 0.3
    overlap_arcsec: float = 50.0
    pixel_scale_arcsec: float = 0.2

    def __post_init__(self) -> None:
        n = 180.0 / self.patch_deg
        if self.patch_deg <= 0 or abs(n - round(n)) > 1e-9:
            raise ValueError(f"180 / patch_deg must be an integer, got patch_deg={self.patch_deg}")
        if self.overlap_arcsec <= 0 or self.pixel_scale_arcsec <= 0:
            raise ValueError("overlap_arcsec and pixel_scale_arcsec must be positive")

    @property
    def n_rings(self) -> int:
        """Number of declination rings (the two polar caps included)."""
        return round(180.0 / self.patch_deg) + 1

    def n_cells(self, ring: int) -> int:
        """Number of RA cells in ``ring``."""
        return _n_cells(self.patch_deg, ring)

    def patch_center(self, patch: PatchId) -> tuple[float, float]:
        """(ra, dec) of the patch's tangent point, degrees."""
        self._check(patch)
        dec = -90.0 + patch.ring * self.patch_deg
        n = self.n_cells(patch.ring)
        return ((patch.cell + 0.5) * 360.0 / n if n > 1 else 0.0), dec

    def find_patch(self, ra_deg: np.ndarray, dec_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Ring and cell of the inner regions containing sky positions (vectorised)."""
        dec = np.clip(np.asarray(dec_deg, np.float64), -90.0, 90.0)
        ra = np.mod(np.asarray(ra_deg, np.float64), 360.0)
        ring = np.clip(np.floor((dec + 90.0) / self.patch_deg + 0.5), 0, self.n_rings - 1)
        ring = ring.astype(np.int64)
        ncell = np.array([self.n_cells(int(r)) for r in np.unique(ring)])
        lookup = dict(zip(np.unique(ring).tolist(), ncell.tolist(), strict=True))
        n = np.vectorize(lookup.__getitem__, otypes=[np.int64])(ring) if ring.size else ring
        cell = np.minimum(np.floor(ra / (360.0 / n)).astype(np.int64), n - 1)
        return ring, cell

    def inner_contains(self, patch: PatchId, ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
        """Whether sky positions lie in the patch's inner region."""
        ring, cell = self.find_patch(ra_deg, dec_deg)
        return np.asarray((ring == patch.ring) & (cell == patch.cell))

    def patch_wcs(self, patch: PatchId) -> WCS:
        """TAN WCS of the whole patch grid (north up, East left)."""
        return _patch_geometry(self, patch)[0].deepcopy()

    def patch_shape(self, patch: PatchId) -> tuple[int, int]:
        """(ny, nx) of the patch grid."""
        return _patch_geometry(self, patch)[1]

    def patches_overlapping(self, wcs: WCS, shape: tuple[int, int]) -> list[PatchId]:
        """Patches whose inner regions a detector (``wcs``, ``shape`` = (ny, nx)) touches.

        Samples the detector every 64 pixels (edges included): inner regions are at least
        ~0.1° (1800 px) across, so none is missed.
        """
        ny, nx = shape
        xs = np.unique(np.concatenate([np.arange(0, nx, 64), [nx - 1]]))
        ys = np.unique(np.concatenate([np.arange(0, ny, 64), [ny - 1]]))
        gx, gy = np.meshgrid(xs, ys)
        ra, dec = wcs.all_pix2world(gx.ravel(), gy.ravel(), 0)
        ring, cell = self.find_patch(ra, dec)
        pairs = sorted(set(zip(ring.tolist(), cell.tolist(), strict=True)))
        return [PatchId(r, c) for r, c in pairs]

    def _check(self, patch: PatchId) -> None:
        if not (0 <= patch.ring < self.n_rings and 0 <= patch.cell < self.n_cells(patch.ring)):
            raise ValueError(f"no patch {patch} in this skymap")

    def header_cards(self) -> dict[str, float]:
        """FITS keywords that identify this skymap."""
        return {
            "SKYPATCH": self.patch_deg,
            "SKYOVLP": self.overlap_arcsec,
            "SKYPIXSC": self.pixel_scale_arcsec,
        }


@lru_cache(maxsize=4096)
def _n_cells(patch_deg: float, ring: int) -> int:
    n_rings = round(180.0 / patch_deg) + 1
    if ring in (0, n_rings - 1):
        return 1
    dec_c = -90.0 + ring * patch_deg
    d_eq = 0.0 if abs(dec_c) <= patch_deg / 2 else abs(dec_c) - patch_deg / 2
    return max(1, math.ceil(360.0 * math.cos(math.radians(d_eq)) / patch_deg - 1e-9))


def _tan_wcs(ra: float, dec: float, scale_arcsec: float, crpix: tuple[float, float]) -> WCS:
    s = scale_arcsec / 3600.0
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.crval = [ra % 360.0, dec]
    w.wcs.crpix = [crpix[0] + 1.0, crpix[1] + 1.0]
    w.wcs.cd = np.array([[-s, 0.0], [0.0, s]])
    w.wcs.radesys = "ICRS"
    w.wcs.set()
    return w


@lru_cache(maxsize=256)
def _patch_geometry(skymap: SkyMap, patch: PatchId) -> tuple[WCS, tuple[int, int]]:
    skymap._check(patch)
    ra_c, dec_c = skymap.patch_center(patch)
    h = skymap.patch_deg
    n = skymap.n_cells(patch.ring)
    # Outline of the inner region, sampled densely enough for its curvature near the poles.
    t = np.linspace(0.0, 1.0, 201)
    if n == 1:
        ang = 2 * math.pi * t
        r = h / 2.0
        sign = 1.0 if dec_c > 0 else -1.0
        dec_b = sign * (90.0 - r) * np.ones_like(ang)
        ra_b = np.degrees(ang)
    else:
        w = 360.0 / n
        ra0, ra1 = patch.cell * w, (patch.cell + 1) * w
        d0, d1 = max(-90.0, dec_c - h / 2), min(90.0, dec_c + h / 2)
        ra_b = np.concatenate(
            [ra0 + w * t, ra0 + w * t, np.full_like(t, ra0), np.full_like(t, ra1)]
        )
        dec_b = np.concatenate(
            [np.full_like(t, d0), np.full_like(t, d1), d0 + (d1 - d0) * t, d0 + (d1 - d0) * t]
        )
    probe = _tan_wcs(ra_c, dec_c, skymap.pixel_scale_arcsec, (0.0, 0.0))
    x, y = probe.wcs_world2pix(ra_b, dec_b, 0)
    margin = skymap.overlap_arcsec / skymap.pixel_scale_arcsec
    x0, x1 = math.floor(float(np.min(x)) - margin), math.ceil(float(np.max(x)) + margin)
    y0, y1 = math.floor(float(np.min(y)) - margin), math.ceil(float(np.max(y)) + margin)
    wcs = _tan_wcs(ra_c, dec_c, skymap.pixel_scale_arcsec, (-float(x0), -float(y0)))
    shape = (y1 - y0 + 1, x1 - x0 + 1)
    wcs.pixel_shape = (shape[1], shape[0])
    return wcs, shape


def _separation_deg(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    """Angular distance (degrees) of positions from (ra0, dec0)."""
    r, d = np.radians(ra), np.radians(dec)
    r0, d0 = math.radians(ra0), math.radians(dec0)
    cos = np.sin(d) * math.sin(d0) + np.cos(d) * math.cos(d0) * np.cos(r - r0)
    return np.asarray(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def _shifted_wcs(wcs: WCS, x0: int, y0: int, shape: tuple[int, int]) -> WCS:
    """WCS of the sub-image whose pixel (0, 0) is pixel (x0, y0) of ``wcs``."""
    out = wcs.deepcopy()
    out.wcs.crpix = [wcs.wcs.crpix[0] - x0, wcs.wcs.crpix[1] - y0]
    out.pixel_shape = (shape[1], shape[0])
    out.wcs.set()
    return out


# -- pixel mappings --------------------------------------------------------------------------


@dataclass
class _Blocks:
    """Affine approximations of a dst → src pixel mapping, one per dst block."""

    y0: np.ndarray
    x0: np.ndarray
    h: np.ndarray
    w: np.ndarray
    matrix: np.ndarray
    """(n, 2, 2): (src_row, src_col) = matrix @ (row, col) + offset, block-local (row, col)."""
    offset: np.ndarray
    """(n, 2)."""
    curvature: float
    """Largest departure of the mapping from affine over a block (pixels)."""

    def __len__(self) -> int:
        return int(self.y0.size)

    def subset(self, sel: np.ndarray) -> _Blocks:
        return _Blocks(
            self.y0[sel],
            self.x0[sel],
            self.h[sel],
            self.w[sel],
            self.matrix[sel],
            self.offset[sel],
            self.curvature,
        )

    def src_bbox(self, margin: int) -> tuple[int, int, int, int] | None:
        """(y0, y1, x0, x1) of the src pixels the blocks read, ± margin; None if no blocks."""
        if len(self) == 0:
            return None
        corners_r = np.stack([np.zeros_like(self.h), self.h - 1, np.zeros_like(self.h), self.h - 1])
        corners_c = np.stack([np.zeros_like(self.w), np.zeros_like(self.w), self.w - 1, self.w - 1])
        sr = (
            self.matrix[None, :, 0, 0] * corners_r
            + self.matrix[None, :, 0, 1] * corners_c
            + self.offset[None, :, 0]
        )
        sc = (
            self.matrix[None, :, 1, 0] * corners_r
            + self.matrix[None, :, 1, 1] * corners_c
            + self.offset[None, :, 1]
        )
        return (
            math.floor(float(sr.min())) - margin,
            math.ceil(float(sr.max())) + margin + 1,
            math.floor(float(sc.min())) - margin,
            math.ceil(float(sc.max())) + margin + 1,
        )


def pixel_mapping_blocks(
    dst_wcs: WCS,
    dst_shape: tuple[int, int],
    src_wcs: WCS,
    *,
    block: int = BLOCK_PX,
) -> _Blocks:
    """Per-block affine maps from the pixels of ``dst_wcs`` to those of ``src_wcs``.

    The exact mapping (``dst pixel → sky → src pixel`` through astropy, SIP included) is
    evaluated at each block's four corners; the affine part of the bilinear interpolant
    through them is the block's transform, and the bilinear cross term measures how far the
    mapping departs from affine (reported as ``curvature``, pixels).
    """
    ny, nx = dst_shape
    y0s = np.arange(0, ny, block)
    x0s = np.arange(0, nx, block)
    gy, gx = np.meshgrid(y0s, x0s, indexing="ij")
    by, bx = gy.ravel(), gx.ravel()
    h = np.minimum(block, ny - by)
    w = np.minimum(block, nx - bx)
    cy = np.stack([by, by, by + h - 1, by + h - 1], axis=1).astype(np.float64)
    cx = np.stack([bx, bx + w - 1, bx, bx + w - 1], axis=1).astype(np.float64)
    ra, dec = dst_wcs.all_pix2world(cx.ravel(), cy.ravel(), 0)
    sx, sy = src_wcs.all_world2pix(ra, dec, 0)
    sx = np.asarray(sx).reshape(-1, 4)
    sy = np.asarray(sy).reshape(-1, 4)
    wm = np.maximum(w - 1, 1).astype(np.float64)
    hm = np.maximum(h - 1, 1).astype(np.float64)
    matrix = np.empty((by.size, 2, 2))
    offset = np.empty((by.size, 2))
    for k, s in enumerate((sy, sx)):  # k = 0: src row, 1: src col
        d_col = ((s[:, 1] - s[:, 0]) + (s[:, 3] - s[:, 2])) / (2 * wm)
        d_row = ((s[:, 2] - s[:, 0]) + (s[:, 3] - s[:, 1])) / (2 * hm)
        mean = s.mean(axis=1)
        matrix[:, k, 0] = d_row
        matrix[:, k, 1] = d_col
        offset[:, k] = mean - d_row * (h - 1) / 2.0 - d_col * (w - 1) / 2.0
    cross = np.abs(sx[:, 0] - sx[:, 1] - sx[:, 2] + sx[:, 3]) + np.abs(
        sy[:, 0] - sy[:, 1] - sy[:, 2] + sy[:, 3]
    )
    curvature = float(cross.max()) / 4.0 if cross.size else 0.0
    return _Blocks(by, bx, h, w, matrix, offset, curvature)


def _warp_psf(psf: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """Resample a PSF image by the linear part of a dst → src pixel map (row, col order)."""
    n = psf.shape[0]
    c = np.array([(n - 1) / 2.0, (n - 1) / 2.0])
    coef = ndi.spline_filter(psf.astype(np.float64), order=3)
    out = ndi.affine_transform(
        coef, linear, offset=c - linear @ c, order=3, prefilter=False, mode="constant"
    )
    total = float(out.sum())
    if total <= 0:
        return np.asarray(psf, np.float64) / float(psf.sum())
    return np.asarray(out / total)


def _rotation_of(linear: np.ndarray) -> float:
    """Angle (radians) by which a dst → src (row, col) linear map rotates src into dst, in x/y."""
    # In (x, y) order the dst → src map is [[m11, m10], [m01, m00]].
    lx = np.array([[linear[1, 1], linear[1, 0]], [linear[0, 1], linear[0, 0]]])
    return -math.atan2(float(lx[1, 0]), float(lx[0, 0]))


def _rotate_e(e1: float, e2: float, phi: float) -> tuple[float, float]:
    c, s = math.cos(2 * phi), math.sin(2 * phi)
    return c * e1 - s * e2, s * e1 + c * e2


# -- templates -------------------------------------------------------------------------------


@dataclass
class Template:
    """A coadd on (the covered part of) one skymap patch."""

    image: np.ndarray
    """float32 (ny, nx): calibrated surface brightness, nJy per pixel (0 where NO_DATA)."""
    variance: np.ndarray
    """float32: variance of ``image``, nJy²."""
    mask: np.ndarray
    """uint16: :class:`~ldf.pipelines.types.Mask` bits (NO_DATA where no input contributed)."""
    wcs: WCS
    """WCS of ``image`` (the patch's TAN projection shifted to ``origin``)."""
    psf: PsfModel
    """PSF of the coadd (weighted mean of the resampled input PSFs)."""
    band: str
    patch: PatchId
    origin: tuple[int, int] = (0, 0)
    """(x0, y0): where ``image[0, 0]`` lies in the patch grid."""
    depth: np.ndarray | None = None
    """uint8: number of inputs that contributed to each pixel after rejection."""
    inputs: tuple[int, ...] = ()
    """Exposure ids of the inputs."""
    metadata: fits.Header = field(default_factory=fits.Header)

    @property
    def shape(self) -> tuple[int, int]:
        """(ny, nx)."""
        ny, nx = self.image.shape
        return int(ny), int(nx)


def _check_input(exp: Exposure, band: str) -> str | None:
    name = f"exposure {exp.info.exposure_id} ({exp.info.detector})"
    if exp.info.band != band:
        return f"{name} is in band {exp.info.band!r}, not {band!r}"
    if exp.wcs is None:
        return f"{name} has no WCS"
    if exp.psf is None:
        return f"{name} has no PSF model"
    if exp.zero_point is None:
        return f"{name} has no photometric zero point"
    if exp.image.shape != exp.variance.shape or exp.image.shape != exp.mask.shape:
        return f"{name} has image/variance/mask planes of different shapes"
    return None


@dataclass
class _Warped:
    """One input resampled onto (its bounding box in) the template grid."""

    y0: int
    x0: int
    image: np.ndarray
    variance: np.ndarray
    valid: np.ndarray
    saturated: np.ndarray
    weight: float


def _warp_input(
    exp: Exposure,
    sub_wcs: WCS,
    shape: tuple[int, int],
    order: int,
) -> tuple[_Warped | None, np.ndarray, float, float]:
    """Resample one input onto the template grid (nJy per pixel); also its PSF in that frame."""
    assert exp.wcs is not None
    assert exp.psf is not None
    blocks = pixel_mapping_blocks(sub_wcs, shape, exp.wcs)
    ny_in, nx_in = exp.shape
    # Blocks that read any of the input.
    bb = [blocks.subset(np.array([k])).src_bbox(0) for k in range(len(blocks))]
    hit = np.array(
        [b is not None and b[1] > 0 and b[0] < ny_in and b[3] > 0 and b[2] < nx_in for b in bb]
    )
    centre = int(np.argmin((blocks.y0 - shape[0] / 2) ** 2 + (blocks.x0 - shape[1] / 2) ** 2))
    linear = blocks.matrix[centre]
    jac = abs(float(np.linalg.det(linear)))  # src pixels per dst pixel: flux per pixel scales by it
    psf = _warp_psf(exp.psf.stamp(), linear)
    phi = _rotation_of(linear)
    if not hit.any():
        return None, psf, phi, 0.0
    blocks = blocks.subset(hit)
    ys = blocks.y0.min(), int((blocks.y0 + blocks.h).max())
    xs = blocks.x0.min(), int((blocks.x0 + blocks.w).max())
    ny, nx = ys[1] - ys[0], xs[1] - xs[0]
    scale = exp.njy_per_electron() * jac
    bad_in = (exp.mask & _INPUT_REJECT) != 0
    sat_in = (exp.mask & np.uint16(Mask.SAT)) != 0
    img = np.where(bad_in, np.float32(0.0), exp.image).astype(np.float64)
    img *= scale
    coef = ndi.spline_filter(img, order=order, mode="mirror")
    var = np.where(bad_in, np.float32(0.0), exp.variance).astype(np.float32)
    var *= np.float32(scale * scale)
    badf = bad_in.astype(np.float32)
    satf = sat_in.astype(np.float32)
    out_img = np.zeros((ny, nx), np.float32)
    out_var = np.zeros((ny, nx), np.float32)
    out_bad = np.ones((ny, nx), np.float32)
    out_sat = np.zeros((ny, nx), np.float32)
    # Keep a margin of the interpolant's half-width inside the input: beyond it the spline
    # sees the mirrored border, not data.
    edge = (order + 1) / 2.0
    for k in range(len(blocks)):
        m, off = blocks.matrix[k], blocks.offset[k]
        sl = (
            slice(int(blocks.y0[k]) - ys[0], int(blocks.y0[k] + blocks.h[k]) - ys[0]),
            slice(int(blocks.x0[k]) - xs[0], int(blocks.x0[k] + blocks.w[k]) - xs[0]),
        )
        oshape = (int(blocks.h[k]), int(blocks.w[k]))
        kw = {"output_shape": oshape, "output": np.float32}
        out_img[sl] = ndi.affine_transform(
            coef, m, offset=off, order=order, prefilter=False, mode="constant", **kw
        )
        out_var[sl] = ndi.affine_transform(var, m, offset=off, order=1, mode="nearest", **kw)
        out_bad[sl] = ndi.affine_transform(badf, m, offset=off, order=1, cval=1.0, **kw)
        out_sat[sl] = ndi.affine_transform(satf, m, offset=off, order=1, cval=0.0, **kw)
        rr, cc = np.mgrid[0 : oshape[0], 0 : oshape[1]]
        sr = m[0, 0] * rr + m[0, 1] * cc + off[0]
        sc = m[1, 0] * rr + m[1, 1] * cc + off[1]
        outside = (sr < edge - 1) | (sr > ny_in - edge) | (sc < edge - 1) | (sc > nx_in - edge)
        out_bad[sl][outside] = 1.0
    # An output pixel whose interpolation footprint touches a rejected input pixel is unusable.
    valid = out_bad < 1e-3
    med_var = float(np.median(out_var[valid])) if valid.any() else 0.0
    weight = 1.0 / med_var if med_var > 0 else 0.0
    warped = _Warped(
        y0=int(ys[0]),
        x0=int(xs[0]),
        image=out_img,
        variance=out_var,
        valid=valid,
        saturated=out_sat > 1e-3,
        weight=weight,
    )
    return warped, psf, phi, weight


def build_template(
    exposures: Sequence[Exposure],
    skymap: SkyMap,
    patch: PatchId,
    band: str,
    *,
    clip_sigma: float = 4.0,
    clip_fraction: float = 0.15,
    min_inputs: int = 2,
    interpolation_order: int = 5,
    strip_rows: int = 256,
) -> Template:
    """Coadd calibrated exposures onto one skymap patch (see the module docstring).

    Parameters
    ----------
    exposures
        Calibrated, background-subtracted exposures in ``band`` with WCS, PSF and zero point.
        Inputs that do not overlap the patch are ignored.
    skymap, patch
        The patch to build.
    band
        Band of the template; every input must be in it.
    clip_sigma
        Rejection threshold, in units of an input pixel's noise, of the deviation from the
        per-pixel median.
    clip_fraction
        Extra tolerance, as a fraction of the median, for PSF differences between inputs.
    min_inputs
        Fewest inputs a pixel must keep after rejection; pixels with fewer are NO_DATA (a
        single input cannot be cleaned of cosmic rays, and a cosmic ray convolved with the
        matching kernel looks like a faint negative source).
    interpolation_order
        B-spline order of the resampling (5: quintic; 3: cubic).
    strip_rows
        Rows combined at a time (bounds the temporaries).

    Returns
    -------
    Template
        The coadd over the bounding box of the inputs' footprints on the patch.

    Raises
    ------
    DetectorError
        An input lacks a WCS, PSF or zero point or is in another band, or no input overlaps
        the patch.
    """
    if min_inputs < 1:
        raise ValueError(f"min_inputs must be at least 1, got {min_inputs}")
    if not exposures:
        raise DetectorError("templates", f"no input exposures for {band}-band patch {patch}")
    for exp in exposures:
        problem = _check_input(exp, band)
        if problem is not None:
            raise DetectorError("templates", f"cannot coadd {band}-band patch {patch}: {problem}")
    pwcs = skymap.patch_wcs(patch)
    pny, pnx = skymap.patch_shape(patch)
    # Footprints of the inputs on the patch grid.
    ra_p, dec_p = skymap.patch_center(patch)
    reach_deg = math.hypot(pny, pnx) * skymap.pixel_scale_arcsec / 3600.0
    boxes: list[tuple[int, int, int, int] | None] = []
    for exp in exposures:
        assert exp.wcs is not None
        ny, nx = exp.shape
        t = np.linspace(0.0, 1.0, 17)
        ex = np.concatenate([t * (nx - 1), t * (nx - 1), np.zeros_like(t), np.full_like(t, nx - 1)])
        ey = np.concatenate([np.zeros_like(t), np.full_like(t, ny - 1), t * (ny - 1), t * (ny - 1)])
        ra, dec = exp.wcs.all_pix2world(ex, ey, 0)
        if _separation_deg(ra, dec, ra_p, dec_p).min() > reach_deg:
            boxes.append(None)  # far away (possibly beyond the patch's tangent plane)
            continue
        px, py = pwcs.all_world2pix(ra, dec, 0)
        if not (np.all(np.isfinite(px)) and np.all(np.isfinite(py))):
            boxes.append(None)
            continue
        x0, x1 = max(0, math.floor(float(np.min(px)))), min(pnx, math.ceil(float(np.max(px))) + 1)
        y0, y1 = max(0, math.floor(float(np.min(py)))), min(pny, math.ceil(float(np.max(py))) + 1)
        boxes.append((x0, x1, y0, y1) if x1 > x0 and y1 > y0 else None)
    used = [(exp, b) for exp, b in zip(exposures, boxes, strict=True) if b is not None]
    if not used:
        raise DetectorError(
            "templates",
            f"none of the {len(exposures)} input exposures overlaps {band}-band patch {patch}",
        )
    x0 = min(b[0] for _, b in used)
    x1 = max(b[1] for _, b in used)
    y0 = min(b[2] for _, b in used)
    y1 = max(b[3] for _, b in used)
    shape = (y1 - y0, x1 - x0)
    sub_wcs = _shifted_wcs(pwcs, x0, y0, shape)

    warped: list[_Warped] = []
    psfs: list[tuple[np.ndarray, float, PsfModel, float]] = []
    for exp, _ in used:
        wp, psf_img, phi, weight = _warp_input(exp, sub_wcs, shape, interpolation_order)
        if wp is None or not wp.valid.any() or weight <= 0:
            continue
        warped.append(wp)
        assert exp.psf is not None
        psfs.append((psf_img, weight, exp.psf, phi))
    if not warped:
        raise DetectorError(
            "templates", f"no usable pixels from the inputs on {band}-band patch {patch}"
        )

    image, variance, mask, depth = _combine(
        warped, shape, clip_sigma, clip_fraction, min_inputs, strip_rows
    )
    if not (depth > 0).any():
        raise DetectorError("templates", f"every input pixel was rejected on patch {patch}")
    psf = _coadd_psf(psfs)
    inputs = tuple(exp.info.exposure_id for exp, _ in used)
    header = fits.Header()
    header["BAND"] = band
    header["PATCH"] = str(patch)
    header["NINPUTS"] = len(warped)
    header["CLIPSIG"] = clip_sigma
    header["CLIPFRAC"] = clip_fraction
    header["INTERPOR"] = interpolation_order
    return Template(
        image=image,
        variance=variance,
        mask=mask,
        wcs=sub_wcs,
        psf=psf,
        band=band,
        patch=patch,
        origin=(x0, y0),
        depth=depth,
        inputs=inputs,
        metadata=header,
    )


def _combine(
    warped: list[_Warped],
    shape: tuple[int, int],
    clip_sigma: float,
    clip_fraction: float,
    min_inputs: int,
    strip_rows: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Clipped, weighted mean of the resampled inputs, strip by strip."""
    ny, nx = shape
    n = len(warped)
    image = np.zeros(shape, np.float32)
    variance = np.zeros(shape, np.float32)
    mask = np.zeros(shape, np.uint16)
    depth = np.zeros(shape, np.uint8)
    weights = np.array([wp.weight for wp in warped], np.float64)
    k2 = clip_sigma**2
    f2 = clip_fraction**2
    for r0 in range(0, ny, strip_rows):
        r1 = min(ny, r0 + strip_rows)
        h = r1 - r0
        vals = np.full((n, h, nx), np.nan, np.float32)
        vars_ = np.zeros((n, h, nx), np.float32)
        sat = np.zeros((h, nx), bool)
        for i, wp in enumerate(warped):
            a0, a1 = max(r0, wp.y0), min(r1, wp.y0 + wp.image.shape[0])
            if a1 <= a0:
                continue
            src = slice(a0 - wp.y0, a1 - wp.y0)
            dst_r = slice(a0 - r0, a1 - r0)
            dst_c = slice(wp.x0, wp.x0 + wp.image.shape[1])
            ok = wp.valid[src]
            vals[i, dst_r, dst_c] = np.where(ok, wp.image[src], np.nan)
            vars_[i, dst_r, dst_c] = wp.variance[src]
            sat[dst_r, dst_c] |= wp.saturated[src] & ~ok
        finite = np.isfinite(vals)
        nval = finite.sum(axis=0)
        srt = np.sort(vals, axis=0)  # NaN last
        lo = np.clip((nval - 1) // 2, 0, n - 1)[None]
        hi = np.clip(nval // 2, 0, n - 1)[None]
        med = 0.5 * (
            np.take_along_axis(srt, lo, axis=0)[0] + np.take_along_axis(srt, hi, axis=0)[0]
        )
        dev2 = (vals - med[None]) ** 2
        # Noise of (value − median): the value's own plus the median's (≈ π/2n of one input's).
        tol2 = k2 * (
            vars_ * (1.0 + np.pi / (2.0 * np.maximum(nval, 1)))[None] + f2 * med[None] ** 2
        )
        with np.errstate(invalid="ignore"):
            keep = finite & (dev2 <= tol2)
        keep &= (nval >= 3)[None]
        # Two inputs: keep both if they agree; if not, there is no telling which one holds a
        # cosmic ray (or its interpolation ringing, which is negative): keep neither.
        two = nval == 2
        if two.any():
            a = srt[0]
            b = srt[1]
            va = np.where(vals == a[None], vars_, 0.0).max(axis=0)
            vb = np.where(vals == b[None], vars_, 0.0).max(axis=0)
            agree = (b - a) ** 2 <= k2 * (va + vb + f2 * (0.5 * (a + b)) ** 2)
            keep |= finite & (two & agree)[None]
        keep |= finite & (nval == 1)[None]
        n_kept = keep.sum(axis=0)
        keep &= (n_kept >= min_inputs)[None]
        w = keep * weights[:, None, None]
        wsum = w.sum(axis=0)
        good = wsum > 0
        safe = np.where(good, wsum, 1.0)
        image[r0:r1] = np.where(good, (w * np.nan_to_num(vals)).sum(axis=0) / safe, 0.0)
        variance[r0:r1] = np.where(good, (w * w * vars_).sum(axis=0) / safe**2, 0.0)
        depth[r0:r1] = keep.sum(axis=0).astype(np.uint8)
        m = np.zeros((h, nx), np.uint16)
        m[~good] |= np.uint16(Mask.NO_DATA)
        m[~good & sat] |= np.uint16(Mask.SAT)
        m[good & (nval < 3)] |= np.uint16(Mask.SUSPECT)
        mask[r0:r1] = m
    return image, variance, mask, depth


def _coadd_psf(psfs: list[tuple[np.ndarray, float, PsfModel, float]]) -> PsfModel:
    size = max(p[0].shape[0] for p in psfs)
    acc = np.zeros((size, size))
    wsum = 0.0
    fwhm = e1 = e2 = 0.0
    for img, w, model, phi in psfs:
        pad = (size - img.shape[0]) // 2
        acc += w * np.pad(img, pad)
        wsum += w
        fwhm += w * model.fwhm_px
        r1, r2 = _rotate_e(model.e1, model.e2, phi)
        e1 += w * r1
        e2 += w * r2
    acc /= acc.sum()
    return PsfModel(image=acc.astype(np.float32), fwhm_px=fwhm / wsum, e1=e1 / wsum, e2=e2 / wsum)


# -- store -----------------------------------------------------------------------------------


def _template_hdul(t: Template, skymap: SkyMap) -> fits.HDUList:
    primary = fits.PrimaryHDU()
    h = primary.header
    h["LDFTYPE"] = ("TEMPLATE", "coadd for difference imaging")
    h["LDFTVER"] = _FITS_VERSION
    h["BAND"] = t.band
    h["PATCH"] = str(t.patch)
    h["ORIGINX"] = (t.origin[0], "x of image[0, 0] in the patch grid")
    h["ORIGINY"] = (t.origin[1], "y of image[0, 0] in the patch grid")
    for key, value in skymap.header_cards().items():
        h[key] = value
    h["PSFFWHM"] = (t.psf.fwhm_px, "coadd PSF FWHM, pixels")
    h["PSFE1"] = t.psf.e1
    h["PSFE2"] = t.psf.e2
    h["BUNIT"] = "nJy"
    for card in t.metadata.cards:
        if card.keyword not in h and card.keyword not in ("", "COMMENT", "HISTORY"):
            h[card.keyword] = (card.value, card.comment)
    wcs_header = t.wcs.to_header()
    img = fits.ImageHDU(t.image.astype(np.float32), header=wcs_header, name="IMAGE")
    img.header["BUNIT"] = "nJy"
    var = fits.ImageHDU(t.variance.astype(np.float32), header=wcs_header, name="VARIANCE")
    var.header["BUNIT"] = "nJy2"
    msk = fits.ImageHDU(t.mask.astype(np.int16), header=wcs_header, name="MASK")
    for plane in Mask:
        bit = int(plane.value).bit_length() - 1
        msk.header[f"MSKBIT{bit}"] = (str(plane.name), f"mask plane of bit {bit}")
    psf = fits.ImageHDU(t.psf.image.astype(np.float32), name="PSF")
    spline = ndi.spline_filter(t.image.astype(np.float64), order=3, mode="mirror")
    spl = fits.ImageHDU(spline.astype(np.float32), header=wcs_header, name="SPLINE")
    spl.header["COMMENT"] = "cubic B-spline coefficients of IMAGE (scipy.ndimage, mirror)"
    var_b = fits.ImageHDU(_bin_mean(t.variance.astype(np.float32)), name="VARBIN4")
    var_b.header["COMMENT"] = "VARIANCE averaged over 4x4 pixels (for prompt processing's warp)"
    msk_b = fits.ImageHDU(_bin_or(t.mask.astype(np.uint16)).astype(np.int16), name="MASKBIN4")
    msk_b.header["COMMENT"] = "MASK OR-ed over 4x4 pixels (for prompt processing's warp)"
    hdus: list[fits.hdu.base.ExtensionHDU] = [img, var, msk, psf, spl, var_b, msk_b]
    if t.depth is not None:
        hdus.append(fits.ImageHDU(t.depth.astype(np.uint8), header=wcs_header, name="DEPTH"))
    cols = fits.ColDefs([fits.Column(name="exposure_id", format="K", array=np.array(t.inputs))])
    hdus.append(fits.BinTableHDU.from_columns(cols, name="INPUTS"))
    return fits.HDUList([primary, *hdus])


def _atomic_write(path: Path, hdul: fits.HDUList) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        hdul.writeto(tmp, overwrite=True)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class TemplateStore:
    """Templates on disk: ``<root>/<band>/patch_<ring>_<cell>.fits``.

    Parameters
    ----------
    root
        Directory of the store (created on first save).
    skymap
        The skymap the templates are on.
    """

    def __init__(self, root: Path | str, skymap: SkyMap | None = None) -> None:
        self.root = Path(root)
        self.skymap = skymap or SkyMap()

    def path(self, band: str, patch: PatchId) -> Path:
        """File of one template."""
        return self.root / band / f"patch_{patch.ring:03d}_{patch.cell:04d}.fits"

    def has(self, band: str, patch: PatchId) -> bool:
        """Whether the store has the template."""
        return self.path(band, patch).is_file()

    def save(self, template: Template) -> Path:
        """Write a template atomically (temporary file + ``os.replace``); returns its path."""
        path = self.path(template.band, template.patch)
        _atomic_write(path, _template_hdul(template, self.skymap))
        return path

    def load(self, band: str, patch: PatchId) -> Template:
        """Read a template.

        Raises
        ------
        DetectorError
            The store has no such template, or the file is unreadable or from another skymap.
        """
        path = self.path(band, patch)
        if not path.is_file():
            raise DetectorError(
                "diffim",
                f"no {band}-band template for patch {patch} in {self.root}; "
                f"run `ldf templates build --band {band} --patch {patch}`",
            )
        try:
            with fits.open(path, memmap=False) as hdul:
                h = hdul[0].header
                self._check_header(h, path)
                img = hdul["IMAGE"]
                wcs = WCS(img.header)
                wcs.pixel_shape = (img.data.shape[1], img.data.shape[0])
                psf_img = np.asarray(hdul["PSF"].data, np.float32)
                return Template(
                    image=np.asarray(img.data, np.float32),
                    variance=np.asarray(hdul["VARIANCE"].data, np.float32),
                    mask=np.asarray(hdul["MASK"].data).astype(np.uint16),
                    wcs=wcs,
                    psf=PsfModel(
                        image=psf_img,
                        fwhm_px=float(h["PSFFWHM"]),
                        e1=float(h["PSFE1"]),
                        e2=float(h["PSFE2"]),
                    ),
                    band=str(h["BAND"]),
                    patch=PatchId.parse(str(h["PATCH"])),
                    origin=(int(h["ORIGINX"]), int(h["ORIGINY"])),
                    depth=np.asarray(hdul["DEPTH"].data, np.uint8) if "DEPTH" in hdul else None,
                    inputs=tuple(int(v) for v in hdul["INPUTS"].data["exposure_id"]),
                    metadata=h.copy(),
                )
        except (OSError, KeyError, ValueError, TypeError) as exc:
            raise DetectorError("diffim", f"unreadable template {path}: {exc}") from exc

    def _check_header(self, h: fits.Header, path: Path) -> None:
        for key, value in self.skymap.header_cards().items():
            if key not in h or abs(float(h[key]) - value) > 1e-9:
                raise DetectorError(
                    "diffim", f"template {path} is on another skymap ({key}={h.get(key)!r})"
                )

    def patches_for(self, band: str, wcs: WCS, shape: tuple[int, int]) -> list[PatchId]:
        """Patches a detector (``wcs``, ``shape`` = (ny, nx)) needs that the store has."""
        return [p for p in self.skymap.patches_overlapping(wcs, shape) if self.has(band, p)]

    def copy_patches(
        self, band: str, patches: Sequence[PatchId], dest_root: Path | str
    ) -> TemplateStore:
        """Copy templates into another store (e.g. a worker's local disk); returns that store.

        Each file is copied to a temporary name and renamed, so a reader never sees half a
        file. Patches already present at the destination with the same size are skipped.

        Raises
        ------
        NotFoundError
            One of the patches is not in this store (nothing is copied then).
        """
        missing = [str(p) for p in patches if not self.has(band, p)]
        if missing:
            raise NotFoundError(
                f"no {band}-band template for patch(es) {', '.join(missing)} in {self.root}"
            )
        dest = TemplateStore(dest_root, self.skymap)
        for p in patches:
            src, dst = self.path(band, p), dest.path(band, p)
            if dst.is_file() and dst.stat().st_size == src.stat().st_size:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
            os.close(fd)
            try:
                shutil.copyfile(src, tmp)
                Path(tmp).replace(dst)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return dest

    def warp_to(
        self,
        band: str,
        wcs: WCS,
        shape: tuple[int, int],
        *,
        info: VisitInfo | None = None,
        min_coverage: float = 0.2,
    ) -> Exposure:
        """The templates resampled onto a detector's pixel grid, as an exposure in nJy.

        Each 256-pixel block of the detector is taken from the patch whose inner region
        contains the block's centre (else from any stored patch that holds the whole block)
        and resampled with cubic-spline interpolation by its own affine map; variance and mask
        are resampled from 4×4-binned planes (mean and OR: the mask is grown by up to 3
        pixels, conservatively).

        Parameters
        ----------
        band
            Band of the template.
        wcs, shape
            The detector's WCS and (ny, nx).
        info
            The science exposure's visit info: for messages and the returned exposure's info.
        min_coverage
            Smallest fraction of the detector the template must cover.

        Returns
        -------
        Exposure
            Image in nJy per pixel (``zero_point`` 31.4 and ``exp_time_s`` 1, so
            ``njy_per_electron()`` is 1), variance in nJy², mask with NO_DATA where no
            template covers, PSF of the template rotated into the detector frame.

        Raises
        ------
        DetectorError
            No stored template covers the detector (or less than ``min_coverage`` of it), or
            a template file is unreadable.
        """
        ny, nx = shape
        needed = self.skymap.patches_overlapping(wcs, shape)
        available = [p for p in needed if self.has(band, p)]
        if not available:
            raise DetectorError("diffim", self._missing(band, info, needed))
        # Which patch each block comes from.
        blocks_probe = pixel_mapping_blocks(wcs, shape, wcs)
        cy = blocks_probe.y0 + (blocks_probe.h - 1) / 2.0
        cx = blocks_probe.x0 + (blocks_probe.w - 1) / 2.0
        ra, dec = wcs.all_pix2world(cx, cy, 0)
        ring, cell = self.skymap.find_patch(ra, dec)
        owner = [PatchId(int(r), int(c)) for r, c in zip(ring, cell, strict=True)]

        image = np.zeros(shape, np.float32)
        variance = np.zeros(shape, np.float32)
        mask = np.full(shape, np.uint16(Mask.NO_DATA), np.uint16)
        psf_acc: list[tuple[np.ndarray, float, PsfModel, float]] = []
        used: list[str] = []
        is_owner = {p: np.array([o == p for o in owner]) for p in available}
        done = np.zeros(len(owner), bool)
        with ExitStack() as stack:
            files: dict[PatchId, fits.HDUList] = {}
            for patch in available:
                path = self.path(band, patch)
                try:
                    hdul = stack.enter_context(fits.open(path, memmap=True))
                    self._check_header(hdul[0].header, path)
                except (OSError, KeyError, ValueError, TypeError) as exc:
                    raise DetectorError("diffim", f"unreadable template {path}: {exc}") from exc
                files[patch] = hdul
            # Every block from the patch that owns it; then blocks whose owner is not stored
            # (or holds none of them) from any other stored patch that has them, pixel by pixel.
            for fill in (False, True):
                for patch, hdul in files.items():
                    want = (~is_owner[patch] & ~done) if fill else is_owner[patch]
                    if not want.any():
                        continue
                    try:
                        res = self._warp_patch(hdul, wcs, shape, want, fill, image, variance, mask)
                    except (OSError, KeyError, ValueError, TypeError) as exc:
                        path = self.path(band, patch)
                        raise DetectorError("diffim", f"unreadable template {path}: {exc}") from exc
                    if res is not None:
                        psf_acc.append(res[0])
                        done |= res[1]
                        if str(patch) not in used:
                            used.append(str(patch))
        covered = 1.0 - float(np.count_nonzero(mask & np.uint16(Mask.NO_DATA))) / (ny * nx)
        if not psf_acc or covered < min_coverage:
            where = self._where(band, info)
            raise DetectorError(
                "diffim",
                f"the {band}-band template covers only {100 * covered:.0f}% of {where} "
                f"(need {100 * min_coverage:.0f}%); run `ldf templates build --band {band} "
                f"--patch {','.join(str(p) for p in needed)}`",
            )
        psf = _coadd_psf(psf_acc)
        header = fits.Header()
        header["TMPLBAND"] = band
        header["TMPLPTCH"] = ",".join(used)
        header["TMPLCOV"] = (round(covered, 4), "fraction of the detector covered")
        tinfo = _template_info(info, band)
        return Exposure(
            image=image,
            variance=variance,
            mask=mask,
            info=tinfo,
            metadata=header,
            wcs=wcs,
            pixel_scale_arcsec=self.skymap.pixel_scale_arcsec,
            psf=psf,
            zero_point=AB_NJY_ZERO_POINT,
        )

    def _warp_patch(
        self,
        hdul: fits.HDUList,
        wcs: WCS,
        shape: tuple[int, int],
        want: np.ndarray,
        fill: bool,
        image: np.ndarray,
        variance: np.ndarray,
        mask: np.ndarray,
    ) -> tuple[tuple[np.ndarray, float, PsfModel, float], np.ndarray] | None:
        """Resample this template into the ``want``-ed blocks; returns the PSF entry and the
        blocks it wrote, or None if it had no data for them."""
        img_hdu = hdul["IMAGE"]
        tny, tnx = img_hdu.data.shape
        twcs = WCS(img_hdu.header)
        blocks = pixel_mapping_blocks(wcs, shape, twcs)
        margin = 4
        # Blocks that read any of this template's stored area.
        overlaps = np.zeros(len(blocks), bool)
        for j in np.flatnonzero(want).tolist():
            bb = blocks.subset(np.array([j])).src_bbox(margin)
            assert bb is not None
            overlaps[j] = bb[1] > 0 and bb[3] > 0 and bb[0] < tny and bb[2] < tnx
        take = want & overlaps
        if not take.any():
            return None
        sel = blocks.subset(take)
        bb = sel.src_bbox(margin)
        assert bb is not None
        # Crop (aligned to the binning, so binned pixels are the stored grid's 4×4 cells; a
        # partial last bin is dropped: it is the template's outermost 1–3 pixels, NO_DATA).
        r0 = max(0, bb[0]) // _BIN * _BIN
        c0 = max(0, bb[2]) // _BIN * _BIN
        r1, c1 = min(tny, bb[1]), min(tnx, bb[3])
        rb = r0 + (r1 - r0) // _BIN * _BIN
        cb = c0 + (c1 - c0) // _BIN * _BIN
        if "SPLINE" in hdul:
            coef = np.ascontiguousarray(hdul["SPLINE"].data[r0:r1, c0:c1], dtype=np.float32)
        else:
            raw = np.asarray(hdul["IMAGE"].data[r0:r1, c0:c1], np.float32)
            coef = ndi.spline_filter(raw, order=3, mode="mirror", output=np.float32)
        if "VARBIN4" in hdul and "MASKBIN4" in hdul:
            bsl = (slice(r0 // _BIN, rb // _BIN), slice(c0 // _BIN, cb // _BIN))
            var_b = np.asarray(hdul["VARBIN4"].data[bsl], np.float32)
            msk_b = np.asarray(hdul["MASKBIN4"].data[bsl]).astype(np.uint16)
        else:
            var_b = _bin_mean(np.asarray(hdul["VARIANCE"].data[r0:rb, c0:cb], np.float32))
            msk_b = _bin_or(np.asarray(hdul["MASK"].data[r0:rb, c0:cb]).astype(np.uint16))
        half = (_BIN - 1) / 2.0
        nd = np.uint16(Mask.NO_DATA)
        written = 0
        for k in range(len(sel)):
            m = sel.matrix[k]
            off = sel.offset[k] - np.array([r0, c0])
            y0, x0 = int(sel.y0[k]), int(sel.x0[k])
            h, w = int(sel.h[k]), int(sel.w[k])
            sl = (slice(y0, y0 + h), slice(x0, x0 + w))
            # Flux per pixel scales with the pixel-area ratio (1 to 10⁻⁵ between TAN grids of
            # one pixel scale; applied only when it matters).
            jac = abs(float(np.linalg.det(m)))
            hb, wb = -(-h // _BIN), -(-w // _BIN)
            off_b = (m @ np.array([half, half]) + off - half) / _BIN
            vb = ndi.affine_transform(
                var_b, m, offset=off_b, output_shape=(hb, wb), order=0, mode="nearest",
                output=np.float32,
            )  # fmt: skip
            if abs(jac - 1.0) > 1e-6:
                vb *= np.float32(jac * jac)
            mb = ndi.affine_transform(
                msk_b, m, offset=off_b, output_shape=(hb, wb), order=0, mode="constant",
                cval=int(nd),
            )  # fmt: skip
            written += int(np.count_nonzero((mb & nd) == 0)) * _BIN * _BIN
            if fill:
                out = ndi.affine_transform(
                    coef, m, offset=off, output_shape=(h, w), order=3, prefilter=False,
                    mode="constant", output=np.float32,
                )  # fmt: skip
                mbf, vbf = _upsample(mb, h, w), _upsample(vb, h, w)
                # Only where this patch has data and the image has none yet.
                put = ((mask[sl] & nd) != 0) & ((mbf & nd) == 0)
                image[sl][put] = out[put] * np.float32(jac)
                variance[sl][put] = vbf[put]
                mask[sl][put] = mbf[put]
            else:
                ndi.affine_transform(
                    coef, m, offset=off, order=3, prefilter=False, mode="constant",
                    output=image[sl],
                )  # fmt: skip
                if abs(jac - 1.0) > 1e-6:
                    image[sl] *= np.float32(jac)
                _put_upsampled(variance[sl], vb)
                _put_upsampled(mask[sl], mb)
        hdr = hdul[0].header
        psf_model = PsfModel(
            image=np.asarray(hdul["PSF"].data, np.float32),
            fwhm_px=float(hdr["PSFFWHM"]),
            e1=float(hdr["PSFE1"]),
            e2=float(hdr["PSFE2"]),
        )
        centre = int(np.argmin((sel.y0 - shape[0] / 2) ** 2 + (sel.x0 - shape[1] / 2) ** 2))
        linear = sel.matrix[centre]
        psf_img = _warp_psf(psf_model.stamp(), linear)
        if written == 0:
            return None
        return (psf_img, float(written), psf_model, _rotation_of(linear)), take

    def _where(self, band: str, info: VisitInfo | None) -> str:
        if info is None:
            return "the detector"
        return f"{info.detector} of visit {info.exposure_id}"

    def _missing(self, band: str, info: VisitInfo | None, needed: list[PatchId]) -> str:
        patches = ",".join(str(p) for p in needed)
        return (
            f"no {band}-band template covers {self._where(band, info)} (patches {patches} "
            f"not in {self.root}); run `ldf templates build --band {band} --patch {patches}`"
        )


def _template_info(info: VisitInfo | None, band: str) -> VisitInfo:
    if info is None:
        return VisitInfo(
            instrument="",
            exposure_id=0,
            day_obs=0,
            seq_num=0,
            detector="",
            detector_id=-1,
            obs_type="template",
            band=band,
            physical_filter=None,
            exp_time_s=1.0,
            dark_time_s=1.0,
            mjd_begin_tai=0.0,
            ra_deg=None,
            dec_deg=None,
            rot_sky_deg=None,
            airmass=None,
        )
    return replace(info, obs_type="template", band=band, exp_time_s=1.0, dark_time_s=1.0)


def _bin_mean(a: np.ndarray) -> np.ndarray:
    ny, nx = a.shape
    py, px = -ny % _BIN, -nx % _BIN
    if py or px:
        a = np.pad(a, ((0, py), (0, px)), mode="edge")
    return a.reshape(a.shape[0] // _BIN, _BIN, a.shape[1] // _BIN, _BIN).mean(
        axis=(1, 3), dtype=np.float32
    )


def _bin_or(a: np.ndarray) -> np.ndarray:
    ny, nx = a.shape
    py, px = -ny % _BIN, -nx % _BIN
    if py or px:
        a = np.pad(a, ((0, py), (0, px)), mode="edge")
    r = a.reshape(a.shape[0] // _BIN, _BIN, a.shape[1] // _BIN, _BIN)
    return np.bitwise_or.reduce(np.bitwise_or.reduce(r, axis=3), axis=1)


def _put_upsampled(dst: np.ndarray, small: np.ndarray) -> None:
    """Write ``small`` repeated 4×4 into the view ``dst``."""
    h, w = dst.shape
    dst[...] = _upsample(small, h, w)


def _upsample(a: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.repeat(np.repeat(a, _BIN, axis=0), _BIN, axis=1)[:h, :w]
