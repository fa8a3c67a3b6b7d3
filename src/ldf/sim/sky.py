"""A deterministic simulated sky: stars, transients and periodic variables, with known truth.

The sky is cut into fixed tiles — declination bands 0.5° high, each split in RA into cells
about 0.5° wide — and every tile's content is drawn from its own generator seeded by
``(seed, category, tile[, epoch])``. Any query of a region therefore returns the same objects
as any other query that covers them, whatever its centre or radius, and object ids are stable.

Stars
    Number counts ``dN/dm ∝ 10^(0.2 m)`` in r between 11 and 25 (a halo-dominated faint-end
    slope), normalised to ``N(r < 24) = 4000 + 150000 exp(−|b|/8°)`` per deg² so the density
    rises steeply toward the Galactic plane. Colours follow a piecewise-linear stellar locus
    (blue halo turn-off stars to red M dwarfs, after Covey et al. 2007) with 0.03 mag scatter.
Transients
    Drawn per tile and 50-day epoch: SN-like sources (Bazin et al. 2009 light curve: rise
    time 2–8 d, decline 15–40 d, peak r 18–23, reddening with time) and 'step' sources that
    switch on at a random moment and stay on for an hour to a month (peak 18–23).
Variables
    Periodic stars (RR Lyrae-like saw-tooth light curve, period 0.2–20 d, r-band amplitude
    0.1–1 mag, mean r 16–22), fixed per tile.

Source ids are stable and unique: stars ``10^12 + tile·10^6 + k``, transients
``2·10^15 + (epoch·360000 + tile)·10^4 + k``, variables ``3·10^15 + tile·10^4 + k``, with
``tile = dec_band·1000 + ra_cell``.

``light_curve_mag(sources, band, mjd)`` gives the magnitude of any injected source at any time
(``inf`` when it is not shining).
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = [
    "BANDS",
    "INJECTED_DTYPE",
    "KIND_PERIODIC",
    "KIND_SN",
    "KIND_STEP",
    "STAR_DTYPE",
    "Sky",
    "galactic_latitude",
    "light_curve_mag",
    "star_mags",
]

BANDS = ("u", "g", "r", "i", "z", "y", "white")
"""Bands with magnitudes (``white`` is LATISS's open position, taken as r)."""

STAR_DTYPE = np.dtype(
    [
        ("source_id", "i8"),
        ("ra", "f8"),
        ("dec", "f8"),
        ("u", "f4"),
        ("g", "f4"),
        ("r", "f4"),
        ("i", "f4"),
        ("z", "f4"),
        ("y", "f4"),
    ]
)
"""Catalogue row of a star: id, position (degrees ICRS) and AB magnitudes."""

INJECTED_DTYPE = np.dtype(
    [
        ("source_id", "i8"),
        ("ra", "f8"),
        ("dec", "f8"),
        ("kind", "i1"),
        ("mag0", "f4"),
        ("t0", "f8"),
        ("tau_rise", "f4"),
        ("tau_fall", "f4"),
        ("duration", "f4"),
        ("period", "f4"),
        ("amplitude", "f4"),
        ("dmag", "f4", (len(BANDS),)),
    ]
)
"""An injected source: ``kind`` (KIND_*), ``mag0`` (peak r for transients, mean r for
variables), ``t0`` (MJD of explosion / switch-on / phase zero), time scales (days) and
``dmag`` (magnitude in each of :data:`BANDS` minus r)."""

KIND_SN = 0
"""SN-like transient (Bazin light curve)."""
KIND_STEP = 1
"""Source that switches on at ``t0`` and stays constant for ``duration`` days."""
KIND_PERIODIC = 2
"""Periodic variable star."""

TILE_DEG = 0.5
"""Height of the declination bands and nominal width of the sky tiles."""
EPOCH_DAYS = 50.0
"""Length of the time bins transients are drawn in."""
INVISIBLE_MAG = 27.0
"""Sources fainter than this are not injected (and get no truth rows)."""

_N_DEC = round(180 / TILE_DEG)
_CATEGORY_STARS, _CATEGORY_TRANSIENTS, _CATEGORY_VARIABLES = 1, 2, 3
_ID_STARS, _ID_TRANSIENTS, _ID_VARIABLES = 10**12, 2 * 10**15, 3 * 10**15
_MAX_PER_TILE_STARS = 999_999
_MAX_PER_TILE_INJECTED = 9_999
_MAX_RISE, _MAX_FALL = 8.0, 40.0
_MAX_STEP_DURATION = 30.0
# Visible from t0 − 6 τ_rise to t0 + 6.5 τ_fall (7 mag below peak).
_LOOKBACK_DAYS = 6.5 * _MAX_FALL
_LOOKAHEAD_DAYS = 6.0 * _MAX_RISE
_COUNT_SLOPE = 0.2
_BRIGHT, _FAINT = 11.0, 25.0

# Stellar locus: g−r, u−g, r−i, i−z, z−y along a temperature sequence (hot → cool).
_LOCUS = np.array(
    [
        [0.20, 0.95, 0.05, 0.00, 0.00],
        [0.40, 1.05, 0.12, 0.03, 0.02],
        [0.60, 1.40, 0.20, 0.08, 0.04],
        [0.80, 1.85, 0.28, 0.14, 0.07],
        [1.00, 2.20, 0.38, 0.20, 0.10],
        [1.20, 2.45, 0.55, 0.30, 0.15],
        [1.40, 2.60, 1.00, 0.50, 0.25],
        [1.50, 2.65, 1.60, 0.85, 0.42],
    ]
)
# Transient colours (mag in band minus r) at peak and their change per 30 days after it.
_SN_COLOUR = np.array([0.3, 0.0, 0.0, 0.1, 0.2, 0.3, 0.0], np.float32)
_SN_REDDENING = np.array([1.2, 0.7, 0.0, -0.2, -0.2, -0.2, 0.0], np.float32)
_PERIODIC_AMP = np.array([1.3, 1.2, 1.0, 0.8, 0.7, 0.65, 1.0], np.float32)

# North Galactic pole (ICRS) for Galactic latitude.
_NGP_RA, _NGP_DEC = math.radians(192.85948), math.radians(27.12825)


def galactic_latitude(ra_deg: np.ndarray | float, dec_deg: np.ndarray | float) -> np.ndarray:
    """Galactic latitude (degrees) of ICRS positions."""
    ra, dec = np.radians(ra_deg), np.radians(dec_deg)
    sb = np.sin(dec) * math.sin(_NGP_DEC) + np.cos(dec) * math.cos(_NGP_DEC) * np.cos(ra - _NGP_RA)
    return np.degrees(np.arcsin(np.clip(sb, -1.0, 1.0)))


def star_density(b_deg: float) -> float:
    """Stars per deg² brighter than r = 24 at Galactic latitude ``b_deg``."""
    return 4000.0 + 150_000.0 * math.exp(-abs(b_deg) / 8.0)


def _n_ra(idec: int) -> int:
    dec_mid = -90.0 + (idec + 0.5) * TILE_DEG
    return max(1, int(360.0 * math.cos(math.radians(dec_mid)) / TILE_DEG))


def _tile_bounds(idec: int, ira: int) -> tuple[float, float, float, float]:
    width = 360.0 / _n_ra(idec)
    dec1 = -90.0 + idec * TILE_DEG
    return ira * width, (ira + 1) * width, dec1, dec1 + TILE_DEG


def _tiles_for(ra: float, dec: float, radius: float) -> list[tuple[int, int]]:
    """Tiles that may overlap a circle (conservative)."""
    d1, d2 = max(-90.0, dec - radius), min(90.0, dec + radius)
    i1 = min(_N_DEC - 1, int((d1 + 90.0) // TILE_DEG))
    i2 = min(_N_DEC - 1, int((d2 + 90.0) // TILE_DEG))
    tiles: list[tuple[int, int]] = []
    for idec in range(i1, i2 + 1):
        n = _n_ra(idec)
        lo, hi = -90.0 + idec * TILE_DEG, -90.0 + (idec + 1) * TILE_DEG
        max_abs = max(abs(lo), abs(hi))
        if max_abs >= 89.9 or d2 >= 90.0 or d1 <= -90.0:
            tiles.extend((idec, k) for k in range(n))
            continue
        half = radius / math.cos(math.radians(max_abs))
        if half >= 180.0:
            tiles.extend((idec, k) for k in range(n))
            continue
        width = 360.0 / n
        k1 = math.floor((ra - half) / width)
        k2 = math.floor((ra + half) / width)
        tiles.extend((idec, k % n) for k in range(k1, min(k2, k1 + n - 1) + 1))
    return list(dict.fromkeys(tiles))


def _uniform_positions(
    rng: np.random.Generator, n: int, bounds: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    ra1, ra2, dec1, dec2 = bounds
    ra = rng.uniform(ra1, ra2, n)
    s1, s2 = math.sin(math.radians(dec1)), math.sin(math.radians(dec2))
    dec = np.degrees(np.arcsin(np.clip(rng.uniform(s1, s2, n), -1.0, 1.0)))
    return ra, dec


def _tile_area_deg2(bounds: tuple[float, float, float, float]) -> float:
    ra1, ra2, dec1, dec2 = bounds
    return (
        math.radians(ra2 - ra1)
        * (math.sin(math.radians(dec2)) - math.sin(math.radians(dec1)))
        * (180.0 / math.pi) ** 2
    )


def _power_law_mags(rng: np.random.Generator, n: int, m1: float, m2: float) -> np.ndarray:
    a = _COUNT_SLOPE
    u = rng.random(n)
    lo, hi = 10.0 ** (a * m1), 10.0 ** (a * m2)
    return np.log10(lo + u * (hi - lo)) / a


def _locus_colours(rng: np.random.Generator, n: int, halo_fraction: float) -> np.ndarray:
    """(n, 5) colours g−r, u−g, r−i, i−z, z−y drawn along the stellar locus."""
    halo = rng.random(n) < halo_fraction
    p = np.where(
        halo,
        np.clip(rng.normal(1.2, 0.4, n), 0.0, 7.0),
        1.0 + 6.0 * rng.random(n) ** 0.8,
    )
    grid = np.arange(len(_LOCUS))
    cols = np.stack([np.interp(p, grid, _LOCUS[:, j]) for j in range(_LOCUS.shape[1])], axis=1)
    return cols + rng.normal(0.0, 0.03, cols.shape)


def _colours_to_dmag(c: np.ndarray) -> np.ndarray:
    """(n, 5) locus colours → (n, 7) magnitude offsets from r for :data:`BANDS`."""
    gr, ug, ri, iz, zy = c.T
    out = np.zeros((c.shape[0], len(BANDS)), np.float32)
    out[:, 1] = gr
    out[:, 0] = gr + ug
    out[:, 3] = -ri
    out[:, 4] = -ri - iz
    out[:, 5] = -ri - iz - zy
    return out


def star_mags(stars: np.ndarray, band: str) -> np.ndarray:
    """Magnitudes of catalogue stars in ``band`` ('white' is taken as r)."""
    return np.asarray(stars["r" if band == "white" else band], np.float64)


def light_curve_mag(sources: np.ndarray, band: str, mjd: float | np.ndarray) -> np.ndarray:
    """AB magnitudes of injected sources in ``band`` at ``mjd`` (``inf`` when not shining).

    Parameters
    ----------
    sources
        Array of :data:`INJECTED_DTYPE`.
    band
        One of :data:`BANDS`.
    mjd
        Time (TAI MJD), or one time per source.
    """
    b = BANDS.index(band)
    n = len(sources)
    mag = np.full(n, np.inf)
    if n == 0:
        return mag
    kind = sources["kind"]
    dt = np.broadcast_to(np.asarray(mjd, np.float64) - sources["t0"], (n,))
    base = sources["mag0"].astype(np.float64) + sources["dmag"][:, b]

    sn = kind == KIND_SN
    if np.any(sn):
        tr = sources["tau_rise"][sn].astype(np.float64)
        tf = sources["tau_fall"][sn].astype(np.float64)
        t = dt[sn]
        t_peak = tr * np.log(tf / tr - 1.0)

        def bazin(tt: np.ndarray) -> np.ndarray:
            return np.exp(-tt / tf) / (1.0 + np.exp(-tt / tr))

        with np.errstate(over="ignore", divide="ignore"):
            ratio = bazin(t) / bazin(t_peak)
            m = base[sn] - 2.5 * np.log10(ratio)
        m += _SN_REDDENING[b] * np.clip(t - t_peak, 0.0, None) / 30.0
        visible = (t > -6.0 * tr) & (t < 6.5 * tf)
        mag[sn] = np.where(visible, m, np.inf)

    step = kind == KIND_STEP
    if np.any(step):
        on = (dt[step] >= 0.0) & (dt[step] < sources["duration"][step])
        mag[step] = np.where(on, base[step], np.inf)

    per = kind == KIND_PERIODIC
    if np.any(per):
        phase = np.mod(dt[per] / sources["period"][per], 1.0)
        # Fast rise over 15 % of the period, then a linear decline: 0 = brightest, 1 = faintest.
        shape = np.where(phase < 0.15, 1.0 - phase / 0.15, (phase - 0.15) / 0.85)
        amp = sources["amplitude"][per] * _PERIODIC_AMP[b]
        mag[per] = base[per] + amp * (shape - 0.5)
    mag[mag > INVISIBLE_MAG] = np.inf
    return mag


class Sky:
    """The simulated sky of one simulation seed.

    Parameters
    ----------
    seed
        Everything in the sky follows from it (and from the sky position and epoch).
    star_density_scale
        Multiplies the stellar number counts (tests use small values for sparse fields).
    transient_rate_deg2
        Transients per deg² whose light curve starts in each 50-day epoch.
    variable_density_deg2
        Periodic variable stars per deg².
    """

    def __init__(
        self,
        seed: int,
        *,
        star_density_scale: float = 1.0,
        transient_rate_deg2: float = 20.0,
        variable_density_deg2: float = 50.0,
    ) -> None:
        self.seed = int(seed)
        self.star_density_scale = float(star_density_scale)
        self.transient_rate_deg2 = float(transient_rate_deg2)
        self.variable_density_deg2 = float(variable_density_deg2)
        self._cache: OrderedDict[tuple[int, ...], np.ndarray] = OrderedDict()
        self._cache_size = 1024
        self._lock = threading.Lock()  # renders may share one Sky across threads

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the parameters only (worker processes rebuild tiles on demand)."""
        return {
            "seed": self.seed,
            "star_density_scale": self.star_density_scale,
            "transient_rate_deg2": self.transient_rate_deg2,
            "variable_density_deg2": self.variable_density_deg2,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild from :meth:`__getstate__` output with an empty tile cache."""
        self.__init__(  # type: ignore[misc]
            state["seed"],
            star_density_scale=state["star_density_scale"],
            transient_rate_deg2=state["transient_rate_deg2"],
            variable_density_deg2=state["variable_density_deg2"],
        )

    # -- public queries -------------------------------------------------------------------

    def stars(self, ra_deg: float, dec_deg: float, radius_deg: float) -> np.ndarray:
        """Stars within ``radius_deg`` of a position, as an array of :data:`STAR_DTYPE`."""
        tiles = [
            self._tile((_CATEGORY_STARS, i, k)) for i, k in _tiles_for(ra_deg, dec_deg, radius_deg)
        ]
        return _within(
            np.concatenate(tiles) if tiles else np.empty(0, STAR_DTYPE), ra_deg, dec_deg, radius_deg
        )

    def transients(
        self,
        ra_deg: float,
        dec_deg: float,
        radius_deg: float,
        mjd_start: float,
        mjd_end: float | None = None,
    ) -> np.ndarray:
        """Transients in a region that may shine at some time in ``[mjd_start, mjd_end]``.

        Returns an array of :data:`INJECTED_DTYPE`; use :func:`light_curve_mag` for
        magnitudes.
        """
        mjd_end = mjd_start if mjd_end is None else mjd_end
        e1 = math.floor((mjd_start - _LOOKBACK_DAYS) / EPOCH_DAYS)
        e2 = math.floor((mjd_end + _LOOKAHEAD_DAYS) / EPOCH_DAYS)
        parts = [
            self._tile((_CATEGORY_TRANSIENTS, i, k, e))
            for i, k in _tiles_for(ra_deg, dec_deg, radius_deg)
            for e in range(e1, e2 + 1)
        ]
        found = np.concatenate(parts) if parts else np.empty(0, INJECTED_DTYPE)
        found = _within(found, ra_deg, dec_deg, radius_deg)
        start = found["t0"] - np.where(found["kind"] == KIND_SN, 6.0 * found["tau_rise"], 0.0)
        end = found["t0"] + np.where(
            found["kind"] == KIND_SN, 6.5 * found["tau_fall"], found["duration"]
        )
        return found[(end >= mjd_start) & (start <= mjd_end)]

    def variables(self, ra_deg: float, dec_deg: float, radius_deg: float) -> np.ndarray:
        """Periodic variable stars in a region (array of :data:`INJECTED_DTYPE`)."""
        parts = [
            self._tile((_CATEGORY_VARIABLES, i, k))
            for i, k in _tiles_for(ra_deg, dec_deg, radius_deg)
        ]
        found = np.concatenate(parts) if parts else np.empty(0, INJECTED_DTYPE)
        return _within(found, ra_deg, dec_deg, radius_deg)

    def injected(
        self,
        ra_deg: float,
        dec_deg: float,
        radius_deg: float,
        mjd_start: float,
        mjd_end: float | None = None,
    ) -> np.ndarray:
        """Transients and variables together (array of :data:`INJECTED_DTYPE`)."""
        return np.concatenate(
            [
                self.transients(ra_deg, dec_deg, radius_deg, mjd_start, mjd_end),
                self.variables(ra_deg, dec_deg, radius_deg),
            ]
        )

    # -- tile generation ------------------------------------------------------------------

    def _tile(self, key: tuple[int, ...]) -> np.ndarray:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        category, idec, ira, *rest = key
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, *key])))
        bounds = _tile_bounds(idec, ira)
        uid = idec * 1000 + ira
        if category == _CATEGORY_STARS:
            arr = self._make_stars(rng, bounds, uid)
        elif category == _CATEGORY_TRANSIENTS:
            arr = self._make_transients(rng, bounds, uid, rest[0])
        else:
            arr = self._make_variables(rng, bounds, uid)
        arr.flags.writeable = False  # shared by every caller of the cache
        with self._lock:
            self._cache[key] = arr
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return arr

    def _make_stars(
        self, rng: np.random.Generator, bounds: tuple[float, float, float, float], uid: int
    ) -> np.ndarray:
        ra_c, dec_c = (bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2
        b = float(galactic_latitude(ra_c, dec_c))
        per_deg2_24 = star_density(b) * self.star_density_scale
        # N(<m) ∝ 10^(0.2 m): scale the r < 24 density to the drawn magnitude range.
        frac = (10 ** (_COUNT_SLOPE * _FAINT) - 10 ** (_COUNT_SLOPE * _BRIGHT)) / 10 ** (
            _COUNT_SLOPE * 24.0
        )
        n = min(_MAX_PER_TILE_STARS, int(rng.poisson(per_deg2_24 * frac * _tile_area_deg2(bounds))))
        out = np.empty(n, STAR_DTYPE)
        out["source_id"] = _ID_STARS + uid * (_MAX_PER_TILE_STARS + 1) + np.arange(n)
        out["ra"], out["dec"] = _uniform_positions(rng, n, bounds)
        r = _power_law_mags(rng, n, _BRIGHT, _FAINT)
        halo = 0.3 + 0.4 * abs(b) / 90.0
        dmag = _colours_to_dmag(_locus_colours(rng, n, halo))
        for j, band in enumerate(BANDS[:6]):
            out[band] = r + dmag[:, j]
        return out

    def _make_transients(
        self,
        rng: np.random.Generator,
        bounds: tuple[float, float, float, float],
        uid: int,
        epoch: int,
    ) -> np.ndarray:
        expected = self.transient_rate_deg2 * _tile_area_deg2(bounds)
        n = min(_MAX_PER_TILE_INJECTED, int(rng.poisson(expected)))
        out = np.zeros(n, INJECTED_DTYPE)
        key = epoch * 360_000 + uid
        out["source_id"] = _ID_TRANSIENTS + key * (_MAX_PER_TILE_INJECTED + 1) + np.arange(n)
        out["ra"], out["dec"] = _uniform_positions(rng, n, bounds)
        is_step = rng.random(n) < 0.3
        out["kind"] = np.where(is_step, KIND_STEP, KIND_SN)
        out["mag0"] = rng.uniform(18.0, 23.0, n)
        out["t0"] = epoch * EPOCH_DAYS + rng.uniform(0.0, EPOCH_DAYS, n)
        out["tau_rise"] = rng.uniform(2.0, _MAX_RISE, n)
        out["tau_fall"] = rng.uniform(15.0, _MAX_FALL, n)
        out["duration"] = np.exp(rng.uniform(math.log(1 / 24), math.log(_MAX_STEP_DURATION), n))
        colour = _SN_COLOUR[None, :] + rng.normal(0.0, 0.1, (n, len(BANDS))).astype(np.float32)
        colour[:, 2] = 0.0
        colour[:, 6] = 0.0
        out["dmag"] = colour
        return out

    def _make_variables(
        self, rng: np.random.Generator, bounds: tuple[float, float, float, float], uid: int
    ) -> np.ndarray:
        expected = self.variable_density_deg2 * _tile_area_deg2(bounds)
        n = min(_MAX_PER_TILE_INJECTED, int(rng.poisson(expected)))
        out = np.zeros(n, INJECTED_DTYPE)
        out["source_id"] = _ID_VARIABLES + uid * (_MAX_PER_TILE_INJECTED + 1) + np.arange(n)
        out["ra"], out["dec"] = _uniform_positions(rng, n, bounds)
        out["kind"] = KIND_PERIODIC
        out["mag0"] = rng.uniform(16.0, 22.0, n)
        out["t0"] = rng.uniform(60000.0, 60020.0, n)
        out["period"] = np.exp(rng.uniform(math.log(0.2), math.log(20.0), n))
        out["amplitude"] = rng.uniform(0.1, 1.0, n)
        out["dmag"] = _colours_to_dmag(_locus_colours(rng, n, 0.7))
        return out


def _within(arr: np.ndarray, ra: float, dec: float, radius: float) -> np.ndarray:
    if len(arr) == 0:
        return arr
    r1, d1 = math.radians(ra), math.radians(dec)
    r2, d2 = np.radians(arr["ra"]), np.radians(arr["dec"])
    cos_sep = math.sin(d1) * np.sin(d2) + math.cos(d1) * np.cos(d2) * np.cos(r2 - r1)
    return arr[cos_sep >= math.cos(math.radians(radius))]
