"""Association of a visit's DiaSources with the DiaObjects of the APDB.

Each DiaSource of a difference image is matched to at most one existing DiaObject and each
DiaObject to at most one DiaSource of the visit (LDM-230 §3.1, Level 1 association; Rubin's
``ap_association`` AssociationTask). The match is a nearest-neighbour search on the sphere:
positions become unit vectors, a k-d tree (``scipy.spatial.cKDTree``) of the DiaObjects finds
every pair closer than the radius (chord ``2 sin(r/2)``), and pairs are accepted closest
first — a greedy one-to-one assignment, as ``ap_association`` does. Unmatched DiaSources
found new DiaObjects whose identifier is the founding DiaSource's ``diaSourceId``, as Rubin
does.

Matched DiaObjects get a new version (the APDB keeps the old one with its validity closed):
position moved to the mean of their DiaSources (inverse-variance weighted when both sides
carry ``raErr``/``decErr``, otherwise each DiaSource counts once), ``nDiaSources`` incremented,
first/last DiaSource times, and the per-band light-curve summary of the visit's band, with
the definitions of ``ap_association``'s DiaObject calculation plugins:

* ``<band>_psfFluxMean``/``MeanErr``: inverse-variance weighted mean of ``psfFlux`` and its
  error ``1/sqrt(Σ 1/σ²)``; ``<band>_psfFluxNdata``: the number of finite ``psfFlux``;
* ``<band>_psfFluxSigma``: sample standard deviation (ddof = 1) of ``psfFlux``;
* ``<band>_psfFluxMin``/``Max``/``ErrMean``;
* ``<band>_scienceFluxMean``/``MeanErr``: weighted mean of ``scienceFlux`` and its error.

With the object's DiaSource history (``history=``, the 12 months :meth:`PromptApdb.load_history
<ldf.pipelines.apdb.PromptApdb.load_history>` returns) these are recomputed over history plus
the new DiaSource, as ``ap_association`` does. Without it they are updated from the stored
summary (sufficient statistics: count, Σw, Σwf, min, max, mean error); the weighted means,
counts and extremes are then exact, and ``psfFluxSigma`` is exact when the DiaSources' errors
are equal (the stored weighted mean stands in for the unweighted one).

Identifiers are packed integers (exposure, detector, index): see :func:`dia_source_id`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from astropy.time import Time
from scipy.spatial import cKDTree

from ldf.pipelines.apdb import apdb_columns
from ldf.pipelines.types import DetectorError, VisitInfo

__all__ = [
    "BANDS",
    "DETECTOR_BITS",
    "FORCED_INDEX_BITS",
    "SOURCE_INDEX_BITS",
    "AssociationResult",
    "associate",
    "dia_forced_source_id",
    "dia_forced_source_ids",
    "dia_source_id",
    "dia_source_ids",
    "match_one_to_one",
    "prepare_forced",
]

STAGE = "association"

BANDS = ("u", "g", "r", "i", "z", "y")
"""Bands with DiaObject summary columns in the APDB schema."""

DETECTOR_BITS = 8
"""Detector ids 0..255 (LSSTCam has 205 detectors)."""
SOURCE_INDEX_BITS = 12
"""Up to 4096 DiaSources per detector-visit (a good subtraction has a few hundred)."""
FORCED_INDEX_BITS = 14
"""Up to 16384 DiaForcedSources per detector-visit (every DiaObject in the footprint)."""

_INT64_MAX = 2**63 - 1


def _check_id_inputs(
    exposure_id: int, detector_id: int, first: int, count: int, index_bits: int, what: str
) -> int:
    if exposure_id < 0:
        raise DetectorError(STAGE, f"negative exposure id {exposure_id}")
    if not 0 <= detector_id < 2**DETECTOR_BITS:
        raise DetectorError(
            STAGE, f"detector id {detector_id} outside 0..{2**DETECTOR_BITS - 1}: no {what} id"
        )
    if first < 0:
        raise DetectorError(STAGE, f"negative {what} index {first}")
    if first + count > 2**index_bits:
        raise DetectorError(
            STAGE,
            f"{first + count} {what}s on detector {detector_id}: more than the "
            f"{2**index_bits} an id can number (a failed subtraction?)",
        )
    base = (exposure_id * 2**DETECTOR_BITS + detector_id) * 2**index_bits
    if base + 2**index_bits - 1 > _INT64_MAX:
        raise DetectorError(STAGE, f"exposure id {exposure_id} too large for a 64-bit {what} id")
    return base


def dia_source_id(exposure_id: int, detector_id: int, index: int) -> int:
    """The ``diaSourceId`` of the ``index``-th DiaSource of a detector-visit.

    ``((exposure_id · 256 + detector_id) · 4096 + index)``: unique per source, ordered by
    exposure, decodable (``id >> 20`` is the exposure id). With exposure ids
    ``day_obs · 100000 + seq_num`` this stays inside int64 until day_obs 4.3e7 (year 4300).

    Raises
    ------
    DetectorError
        ``detector_id`` ≥ 256, ``index`` ≥ 4096, or an id that does not fit in int64.
    """
    base = _check_id_inputs(exposure_id, detector_id, index, 1, SOURCE_INDEX_BITS, "DiaSource")
    return base + index


def dia_source_ids(exposure_id: int, detector_id: int, count: int) -> np.ndarray:
    """``diaSourceId`` of DiaSources 0..count-1 of a detector-visit (int64 array)."""
    base = _check_id_inputs(exposure_id, detector_id, 0, count, SOURCE_INDEX_BITS, "DiaSource")
    return base + np.arange(count, dtype=np.int64)


def dia_forced_source_id(exposure_id: int, detector_id: int, index: int) -> int:
    """The ``diaForcedSourceId`` of the ``index``-th forced measurement of a detector-visit.

    ``((exposure_id · 256 + detector_id) · 16384 + index)``: forced photometry measures every
    DiaObject in the detector's footprint, so it gets 14 index bits (int64 holds them until
    day_obs 2.2e7, the year 2199).

    Raises
    ------
    DetectorError
        ``detector_id`` ≥ 256, ``index`` ≥ 16384, or an id that does not fit in int64.
    """
    base = _check_id_inputs(
        exposure_id, detector_id, index, 1, FORCED_INDEX_BITS, "DiaForcedSource"
    )
    return base + index


def dia_forced_source_ids(exposure_id: int, detector_id: int, count: int) -> np.ndarray:
    """``diaForcedSourceId`` of forced measurements 0..count-1 (int64 array)."""
    base = _check_id_inputs(
        exposure_id, detector_id, 0, count, FORCED_INDEX_BITS, "DiaForcedSource"
    )
    return base + np.arange(count, dtype=np.int64)


@dataclass
class AssociationResult:
    """A visit's DiaSources tied to DiaObjects, ready for :meth:`PromptApdb.store`."""

    sources: pd.DataFrame
    """The DiaSources with identifiers, times, band and ``diaObjectId``."""
    objects: pd.DataFrame
    """New and updated DiaObjects (one new version each), every APDB column present; row k
    is the DiaObject of ``sources`` row k."""
    n_new: int
    """DiaObjects founded by this visit."""
    n_matched: int
    """DiaSources matched to an existing DiaObject."""


def _unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    ra = np.radians(np.asarray(ra_deg, np.float64))
    dec = np.radians(np.asarray(dec_deg, np.float64))
    cd = np.cos(dec)
    return np.column_stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)])


def _radec(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norm = np.linalg.norm(xyz, axis=1)
    x, y, z = (xyz / norm[:, None]).T
    ra = np.degrees(np.arctan2(y, x)) % 360.0
    dec = np.degrees(np.arcsin(np.clip(z, -1.0, 1.0)))
    return ra, dec


def match_one_to_one(
    ra1: np.ndarray,
    dec1: np.ndarray,
    ra2: np.ndarray,
    dec2: np.ndarray,
    radius_arcsec: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest-first one-to-one matching of two catalogues on the sphere.

    Parameters
    ----------
    ra1, dec1
        First catalogue (e.g. DiaSources), degrees.
    ra2, dec2
        Second catalogue (e.g. DiaObjects), degrees.
    radius_arcsec
        Largest separation of a match, arcseconds.

    Returns
    -------
    i1, i2, sep_arcsec
        Indices of matched pairs into each catalogue and their separations, sorted by
        separation. Each index appears at most once.
    """
    empty = np.zeros(0, np.int64)
    if len(ra1) == 0 or len(ra2) == 0:
        return empty, empty, np.zeros(0)
    chord = 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0)
    xyz1, xyz2 = _unit_vectors(ra1, dec1), _unit_vectors(ra2, dec2)
    # Every pair within the radius (sparse; a few per source at most).
    pairs = cKDTree(xyz1).sparse_distance_matrix(cKDTree(xyz2), chord, output_type="ndarray")
    i = pairs["i"].astype(np.int64)
    j = pairs["j"].astype(np.int64)
    d = pairs["v"].astype(np.float64)
    keep_i, keep_j, keep_d = [], [], []
    # Greedy closest-first assignment, vectorised by rounds: a pair that is the closest of
    # both its source and its object is in the greedy solution; take all such pairs, drop
    # every pair touching them, repeat. (The closest remaining pair always qualifies.)
    while len(d):
        order = np.lexsort((j, i, d))
        i, j, d = i[order], j[order], d[order]
        first_i = np.zeros(len(i), bool)
        first_i[np.unique(i, return_index=True)[1]] = True
        first_j = np.zeros(len(j), bool)
        first_j[np.unique(j, return_index=True)[1]] = True
        take = first_i & first_j
        keep_i.append(i[take])
        keep_j.append(j[take])
        keep_d.append(d[take])
        rest = ~np.isin(i, i[take]) & ~np.isin(j, j[take])
        i, j, d = i[rest], j[rest], d[rest]
    if not keep_i:
        return empty, empty, np.zeros(0)
    mi, mj, md = np.concatenate(keep_i), np.concatenate(keep_j), np.concatenate(keep_d)
    order = np.argsort(md, kind="stable")
    sep = np.degrees(2.0 * np.arcsin(np.clip(md[order] / 2.0, 0.0, 1.0))) * 3600.0
    return mi[order], mj[order], sep


# -- the DiaObject light-curve summary --------------------------------------------------------

_SUMS = ("n", "sw", "swf", "s1", "s2", "fmin", "fmax", "serr", "nerr", "ssw", "sswf")


def _zero_sums(k: int) -> dict[str, np.ndarray]:
    out = {name: np.zeros(k) for name in _SUMS}
    out["fmin"] = np.full(k, np.inf)
    out["fmax"] = np.full(k, -np.inf)
    return out


def _col(frame: pd.DataFrame, name: str) -> np.ndarray:
    """A column as float64 with NaN for missing (also when the column is absent)."""
    if name not in frame.columns:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[name], errors="coerce").to_numpy(np.float64, na_value=np.nan)


def _source_sums(flux: np.ndarray, err: np.ndarray, sflux: np.ndarray, serr: np.ndarray) -> dict:
    """Per-row sufficient statistics of DiaSources (rows with no data contribute zeros)."""
    ok = np.isfinite(flux)
    wok = ok & np.isfinite(err) & (err > 0)
    w = np.where(wok, 1.0 / np.where(wok, err, 1.0) ** 2, 0.0)
    f0 = np.where(ok, flux, 0.0)
    eok = np.isfinite(err)
    sok = np.isfinite(sflux) & np.isfinite(serr) & (serr > 0)
    sw = np.where(sok, 1.0 / np.where(sok, serr, 1.0) ** 2, 0.0)
    return {
        "n": ok.astype(np.float64),
        "sw": w,
        "swf": w * f0,
        "s1": f0,
        "s2": f0 * f0,
        "fmin": np.where(ok, flux, np.inf),
        "fmax": np.where(ok, flux, -np.inf),
        "serr": np.where(ok & eok, err, 0.0),
        "nerr": (ok & eok).astype(np.float64),
        "ssw": sw,
        "sswf": sw * np.where(sok, sflux, 0.0),
    }


def _summary_sums(objects: pd.DataFrame, band: str) -> dict[str, np.ndarray]:
    """Sufficient statistics recovered from stored DiaObject summary columns."""
    n = np.nan_to_num(_col(objects, f"{band}_psfFluxNdata"))
    mean = _col(objects, f"{band}_psfFluxMean")
    merr = _col(objects, f"{band}_psfFluxMeanErr")
    sigma = np.nan_to_num(_col(objects, f"{band}_psfFluxSigma"))
    has = (n > 0) & np.isfinite(mean)
    wok = has & np.isfinite(merr) & (merr > 0)
    sw = np.where(wok, 1.0 / np.where(wok, merr, 1.0) ** 2, 0.0)
    m0 = np.where(has, mean, 0.0)
    n0 = np.where(has, n, 0.0)
    errmean = _col(objects, f"{band}_psfFluxErrMean")
    eok = has & np.isfinite(errmean)
    smean = _col(objects, f"{band}_scienceFluxMean")
    smerr = _col(objects, f"{band}_scienceFluxMeanErr")
    sok = np.isfinite(smean) & np.isfinite(smerr) & (smerr > 0)
    ssw = np.where(sok, 1.0 / np.where(sok, smerr, 1.0) ** 2, 0.0)
    fmin = _col(objects, f"{band}_psfFluxMin")
    fmax = _col(objects, f"{band}_psfFluxMax")
    return {
        "n": n0,
        "sw": sw,
        "swf": sw * m0,
        "s1": n0 * m0,
        "s2": np.maximum(n0 - 1, 0) * sigma**2 + n0 * m0**2,
        "fmin": np.where(has & np.isfinite(fmin), fmin, np.inf),
        "fmax": np.where(has & np.isfinite(fmax), fmax, -np.inf),
        "serr": np.where(eok, n0 * errmean, 0.0),
        "nerr": np.where(eok, n0, 0.0),
        "ssw": ssw,
        "sswf": ssw * np.where(sok, smean, 0.0),
    }


def _history_sums(
    history: pd.DataFrame, object_ids: np.ndarray, band: str, exclude: np.ndarray
) -> dict[str, np.ndarray]:
    """Sufficient statistics of each object's DiaSources in ``history`` (one band)."""
    out = _zero_sums(len(object_ids))
    if history is None or not len(history) or not len(object_ids):
        return out
    h = history
    if not {"diaObjectId", "band"} <= set(h.columns):
        raise DetectorError(STAGE, "DiaSource history lacks diaObjectId/band columns")
    sel = h["diaObjectId"].isin(object_ids).to_numpy() & (h["band"] == band).to_numpy()
    if "diaSourceId" in h.columns:
        sel &= ~h["diaSourceId"].isin(exclude).to_numpy()
    h = h[sel]
    if not len(h):
        return out
    sums = _source_sums(
        _col(h, "psfFlux"), _col(h, "psfFluxErr"), _col(h, "scienceFlux"), _col(h, "scienceFluxErr")
    )
    frame = pd.DataFrame(sums)
    frame["oid"] = h["diaObjectId"].to_numpy(np.int64)
    agg = frame.groupby("oid").agg(
        {k: ("min" if k == "fmin" else "max" if k == "fmax" else "sum") for k in _SUMS}
    )
    agg = agg.reindex(object_ids)
    for k in _SUMS:
        fill = np.inf if k == "fmin" else -np.inf if k == "fmax" else 0.0
        out[k] = agg[k].to_numpy(np.float64, na_value=fill)
    return out


def _derive(s: dict[str, np.ndarray], band: str) -> dict[str, np.ndarray]:
    n, sw = s["n"], s["sw"]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(sw > 0, s["swf"] / sw, np.nan)
        merr = np.where(sw > 0, 1.0 / np.sqrt(sw), np.nan)
        var = np.where(n >= 2, np.maximum(s["s2"] - s["s1"] ** 2 / np.maximum(n, 1), 0.0), np.nan)
        sigma = np.sqrt(var / np.maximum(n - 1, 1))
        errmean = np.where(s["nerr"] > 0, s["serr"] / s["nerr"], np.nan)
        smean = np.where(s["ssw"] > 0, s["sswf"] / s["ssw"], np.nan)
        smerr = np.where(s["ssw"] > 0, 1.0 / np.sqrt(s["ssw"]), np.nan)
    return {
        f"{band}_psfFluxNdata": n.astype(np.int64),
        f"{band}_psfFluxMean": mean,
        f"{band}_psfFluxMeanErr": merr,
        f"{band}_psfFluxSigma": sigma,
        f"{band}_psfFluxMin": np.where(np.isfinite(s["fmin"]), s["fmin"], np.nan),
        f"{band}_psfFluxMax": np.where(np.isfinite(s["fmax"]), s["fmax"], np.nan),
        f"{band}_psfFluxErrMean": errmean,
        f"{band}_scienceFluxMean": smean,
        f"{band}_scienceFluxMeanErr": smerr,
    }


# -- DataFrame shaping --------------------------------------------------------------------------

_INT_TYPES = ("long", "int", "short", "byte")


def _typed(values: pd.Series | np.ndarray, datatype: str, nullable: bool) -> pd.Series:
    """A column with the pandas dtype of an APDB column type."""
    s = pd.Series(values).reset_index(drop=True)
    if datatype in _INT_TYPES:
        num = pd.to_numeric(s, errors="coerce")
        return num.astype("Int64") if nullable else num.astype(np.int64)
    if datatype in ("float", "double"):
        return pd.Series(pd.to_numeric(s, errors="coerce").to_numpy(np.float64, na_value=np.nan))
    if datatype == "boolean":
        return s.astype("boolean")
    return s.astype(object).where(s.notna(), None)


def _object_frame(columns: dict[str, pd.Series | np.ndarray], n: int) -> pd.DataFrame:
    """A DiaObject table with every APDB column, in schema order and dtype."""
    data = {}
    for col in apdb_columns("DiaObject"):
        dtype = col.datatype.value
        if col.name in columns:
            values = columns[col.name]
        elif dtype in _INT_TYPES and not col.nullable:
            values = np.zeros(n, np.int64)
        else:
            values = np.full(n, np.nan)
        data[col.name] = _typed(values, dtype, col.nullable)
    return pd.DataFrame(data)


def _require(frame: pd.DataFrame, names: Sequence[str]) -> None:
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise DetectorError(STAGE, f"DiaSource table lacks column(s) {', '.join(missing)}")


def associate(
    dia_sources: pd.DataFrame,
    objects: pd.DataFrame | None,
    *,
    info: VisitInfo,
    radius_arcsec: float = 1.0,
    history: pd.DataFrame | None = None,
    processed_mjd_tai: float | None = None,
) -> AssociationResult:
    """Tie a detector-visit's DiaSources to DiaObjects (new or existing).

    Parameters
    ----------
    dia_sources
        The DIA stage's DiaSources (APDB column names; at least ``ra``, ``dec`` in degrees
        and ``x``, ``y`` in pixels; fluxes in nJy), without identifiers or times.
    objects
        Latest versions of the DiaObjects around the detector (from the APDB), or None.
    info
        The visit: exposure id (= ``visit``), detector id, mid-exposure time, band,
        exposure time.
    radius_arcsec
        Association radius, arcseconds.
    history
        The DiaObjects' earlier DiaSources (e.g. 12 months from the APDB). When given, the
        per-band summaries are recomputed over history plus the new DiaSource; otherwise they
        are updated from the stored summary (see the module docstring).
    processed_mjd_tai
        ``timeProcessedMjdTai`` to record (default: now).

    Returns
    -------
    AssociationResult

    Raises
    ------
    DetectorError
        The visit has no band, a DiaSource has no finite position, required columns are
        missing, or the detector has more DiaSources than an id can number.
    """
    if info.band is None:
        raise DetectorError(STAGE, f"exposure {info.exposure_id} has no band")
    if not (radius_arcsec > 0 and math.isfinite(radius_arcsec)):
        raise DetectorError(STAGE, f"association radius must be > 0, got {radius_arcsec}")
    band = info.band
    if band not in BANDS:
        raise DetectorError(STAGE, f"band {band!r} has no DiaObject columns (one of {BANDS})")
    _require(dia_sources, ("ra", "dec", "x", "y"))
    n = len(dia_sources)
    src = dia_sources.reset_index(drop=True).copy()
    ra = _col(src, "ra")
    dec = _col(src, "dec")
    bad = ~(np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0))
    if bad.any():
        raise DetectorError(STAGE, f"{int(bad.sum())} DiaSource(s) without a valid ra/dec")
    t_mid = info.mjd_mid_tai
    t_proc = processed_mjd_tai if processed_mjd_tai is not None else float(Time.now().tai.mjd)

    # Identifiers, visit metadata, and the APDB's non-nullable DiaSource columns.
    src["diaSourceId"] = dia_source_ids(info.exposure_id, info.detector_id, n)
    src["visit"] = np.int64(info.exposure_id)
    src["detector"] = np.int64(info.detector_id)
    src["midpointMjdTai"] = t_mid
    src["timeProcessedMjdTai"] = t_proc
    src["exposureTime"] = float(info.exp_time_s)
    src["band"] = band
    for col in apdb_columns("DiaSource"):
        if not col.nullable and col.name not in src.columns:
            default = col.value if col.value is not None else 0
            src[col.name] = np.full(n, default, np.int64)

    if objects is not None and len(objects):
        missing = [c for c in ("diaObjectId", "ra", "dec") if c not in objects.columns]
        if missing:
            raise DetectorError(STAGE, f"DiaObject table lacks column(s) {', '.join(missing)}")
        objs = objects.reset_index(drop=True)
    else:
        objs = pd.DataFrame({"diaObjectId": np.zeros(0, np.int64), "ra": [], "dec": []})
    si, oi, _ = match_one_to_one(ra, dec, _col(objs, "ra"), _col(objs, "dec"), radius_arcsec)
    by_source = np.argsort(si, kind="stable")
    si, oi = si[by_source], oi[by_source]
    object_id = src["diaSourceId"].to_numpy(np.int64).copy()
    matched_ids = objs["diaObjectId"].to_numpy(np.int64)[oi] if len(oi) else np.zeros(0, np.int64)
    object_id[si] = matched_ids
    src["diaObjectId"] = object_id
    new = np.ones(n, bool)
    new[si] = False

    flux, ferr = _col(src, "psfFlux"), _col(src, "psfFluxErr")
    sflux, sferr = _col(src, "scienceFlux"), _col(src, "scienceFluxErr")
    ra_err, dec_err = _col(src, "raErr"), _col(src, "decErr")

    # -- new DiaObjects (one per unmatched DiaSource) --
    k = int(new.sum())
    new_sums = {key: v[new] for key, v in _source_sums(flux, ferr, sflux, sferr).items()}
    new_cols: dict[str, pd.Series | np.ndarray] = {
        "diaObjectId": object_id[new],
        "validityStartMjdTai": np.full(k, t_mid),
        "validityEndMjdTai": np.full(k, np.nan),
        "ra": ra[new],
        "dec": dec[new],
        "raErr": ra_err[new],
        "decErr": dec_err[new],
        "nDiaSources": np.ones(k, np.int64),
        "firstDiaSourceMjdTai": np.full(k, t_mid),
        "lastDiaSourceMjdTai": np.full(k, t_mid),
        **_derive(new_sums, band),
    }
    new_objects = _object_frame(new_cols, k)

    # -- updated versions of the matched DiaObjects --
    m = len(si)
    old = objs.iloc[oi].reset_index(drop=True)
    upd_cols: dict[str, pd.Series | np.ndarray] = {c: old[c] for c in old.columns}
    n_old = np.nan_to_num(_col(old, "nDiaSources")).astype(np.int64)
    xyz_old = _unit_vectors(_col(old, "ra"), _col(old, "dec"))
    xyz_new = _unit_vectors(ra[si], dec[si])
    o_var = 0.5 * (_col(old, "raErr") ** 2 + _col(old, "decErr") ** 2)
    s_var = 0.5 * (ra_err[si] ** 2 + dec_err[si] ** 2)
    ivw = np.isfinite(o_var) & (o_var > 0) & np.isfinite(s_var) & (s_var > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        w_old = np.where(ivw, 1.0 / o_var, np.maximum(n_old, 1))
        w_new = np.where(ivw, 1.0 / s_var, 1.0)
    pos_ra, pos_dec = _radec(xyz_old * w_old[:, None] + xyz_new * w_new[:, None])
    upd_cols["ra"] = pos_ra
    upd_cols["dec"] = pos_dec
    with np.errstate(divide="ignore"):
        pos_err = np.where(ivw, np.sqrt(1.0 / (w_old + w_new)), np.nan)
    upd_cols["raErr"] = np.where(ivw, pos_err, _col(old, "raErr"))
    upd_cols["decErr"] = np.where(ivw, pos_err, _col(old, "decErr"))
    upd_cols["nDiaSources"] = n_old + 1
    first = _col(old, "firstDiaSourceMjdTai")
    last = _col(old, "lastDiaSourceMjdTai")
    upd_cols["firstDiaSourceMjdTai"] = np.fmin(first, t_mid)
    upd_cols["lastDiaSourceMjdTai"] = np.fmax(last, t_mid)
    upd_cols["validityStartMjdTai"] = np.full(m, t_mid)
    upd_cols["validityEndMjdTai"] = np.full(m, np.nan)
    ids = old["diaObjectId"].to_numpy(np.int64) if m else np.zeros(0, np.int64)
    if history is not None:
        before = _history_sums(history, ids, band, src["diaSourceId"].to_numpy(np.int64))
    else:
        before = _summary_sums(old, band)
    add = _source_sums(flux[si], ferr[si], sflux[si], sferr[si])
    total = {
        key: (
            np.minimum(before[key], add[key])
            if key == "fmin"
            else np.maximum(before[key], add[key])
            if key == "fmax"
            else before[key] + add[key]
        )
        for key in _SUMS
    }
    upd_cols.update(_derive(total, band))
    updated = _object_frame(upd_cols, m)

    # One DiaObject row per DiaSource, in the DiaSources' order.
    out_objects = pd.concat([updated, new_objects], ignore_index=True) if m else new_objects
    rows = np.argsort(np.concatenate([si, np.flatnonzero(new)]), kind="stable")
    out_objects = out_objects.iloc[rows].reset_index(drop=True)
    return AssociationResult(sources=src, objects=out_objects, n_new=k, n_matched=m)


def prepare_forced(
    forced: pd.DataFrame | None,
    *,
    info: VisitInfo,
    processed_mjd_tai: float | None = None,
) -> pd.DataFrame:
    """Give a detector-visit's forced measurements their APDB identifiers and times.

    Parameters
    ----------
    forced
        Forced photometry at DiaObject positions (``diaObjectId``, ``ra``, ``dec`` in degrees,
        ``psfFlux``/``psfFluxErr`` on the difference image and ``scienceFlux``/
        ``scienceFluxErr`` on the science image, nJy), or None.
    info
        The visit.
    processed_mjd_tai
        ``timeProcessedMjdTai`` to record (default: now).

    Returns
    -------
    pandas.DataFrame
        DiaForcedSource rows with ``diaForcedSourceId``, ``visit``, ``detector``,
        ``midpointMjdTai``, ``timeProcessedMjdTai`` and ``band`` filled (empty if
        ``forced`` is None or empty).

    Raises
    ------
    DetectorError
        Required columns are missing, or more rows than a forced-source id can number.
    """
    if forced is None or not len(forced):
        columns = [c.name for c in apdb_columns("DiaForcedSource")]
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    missing = [c for c in ("diaObjectId", "ra", "dec") if c not in forced.columns]
    if missing:
        raise DetectorError(STAGE, f"forced photometry lacks column(s) {', '.join(missing)}")
    out = forced.reset_index(drop=True).copy()
    n = len(out)
    out["diaObjectId"] = out["diaObjectId"].to_numpy(np.int64)
    out["diaForcedSourceId"] = dia_forced_source_ids(info.exposure_id, info.detector_id, n)
    out["visit"] = np.int64(info.exposure_id)
    out["detector"] = np.int64(info.detector_id)
    out["midpointMjdTai"] = info.mjd_mid_tai
    out["timeProcessedMjdTai"] = (
        processed_mjd_tai if processed_mjd_tai is not None else float(Time.now().tai.mjd)
    )
    out["band"] = info.band
    return out
