"""The astrometric and photometric reference catalogue, sharded on the sky by HTM.

Rubin calibrates against Gaia (astrometry) and the "Monster" refcat (photometry), both
stored as one file per Hierarchical Triangular Mesh trixel (Kunszt, Szalay & Thakar 2001,
"The Hierarchical Triangular Mesh", in *Mining the Sky*, 631; the ``lsst.meas.algorithms``
``IngestIndexedReferenceTask`` layout) at level 7 (trixels ≈ 0.6° across). Here the
simulated sky stands in for Gaia: :meth:`RefcatStore.ingest_region` takes the stars of
:class:`ldf.sim.sky.Sky` in every trixel overlapping a region, down to a magnitude limit, and
writes one ``.npy`` file per trixel (atomically: a temporary name, then ``os.replace``), so a
shard is complete or absent and ingesting is idempotent.

Catalogue errors (what makes it a measurement, not the truth)
    Positions carry 10 mas Gaussian errors per coordinate (Gaia DR3 at G ≈ 19–20);
    magnitudes carry ``σ = 0.005 + 0.015 · 10^(0.4 (m − m_lim))`` capped at 0.02 mag, i.e.
    5 mmag for bright stars rising to 20 mmag at the limit. The errors are drawn from a
    counter-based hash of ``(source_id, quantity)`` (SplitMix64), so a star has the same
    catalogue values in every shard, region and process.

Layout::

    <root>/refcat.json           {"pixelization": "HTM", "level": 7, "dtype": [...]}
    <root>/htm7/<trixel id>.npy  structured array of REFCAT_DTYPE, sorted by source_id
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from lsst.sphgeom import Angle, Circle, HtmPixelization, LonLat, UnitVector3d

from ldf.errors import UserInputError
from ldf.pipelines.types import DetectorError

if TYPE_CHECKING:
    from ldf.sim.sky import Sky

__all__ = [
    "BANDS",
    "HTM_LEVEL",
    "REFCAT_DTYPE",
    "RefcatStore",
    "angular_separation_deg",
]

BANDS = ("u", "g", "r", "i", "z", "y")
"""Bands the catalogue has magnitudes in."""

HTM_LEVEL = 7
"""HTM depth of the shards (Rubin's refcats use 7: 131 072 trixels of ≈ 0.31 deg²)."""

POSITION_ERROR_MAS = 10.0
"""Per-coordinate position error of every catalogue star, milliarcseconds."""

REFCAT_DTYPE = np.dtype(
    [
        ("source_id", "i8"),
        ("ra", "f8"),
        ("dec", "f8"),
        ("ra_err", "f4"),
        ("dec_err", "f4"),
        *[(f, "f4") for b in BANDS for f in (b, f"{b}_err")],
    ]
)
"""Catalogue row: id, ICRS position (degrees) and its errors (``ra_err`` is along RA·cos Dec,
milliarcseconds), AB magnitude and error per band (``u``, ``u_err``, … ``y``, ``y_err``)."""

_STAGE = "astrometry"
_MAG_ERR_MIN, _MAG_ERR_MAX = 0.005, 0.02
_SPLITMIX_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def angular_separation_deg(
    ra1: float | np.ndarray,
    dec1: float | np.ndarray,
    ra2: float | np.ndarray,
    dec2: float | np.ndarray,
) -> np.ndarray:
    """Great-circle separation (degrees), haversine formula (accurate at small angles);
    a numpy scalar for scalar inputs."""
    r1, d1, r2, d2 = (np.radians(v) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    return np.degrees(2.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014), vectorised on uint64 (wrapping)."""
    z = x + _SPLITMIX_GAMMA
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _hash_normal(source_id: np.ndarray, quantity: int) -> np.ndarray:
    """A standard normal deviate per source, a pure function of ``(source_id, quantity)``."""
    key = source_id.astype(np.uint64) * np.uint64(16) + np.uint64(quantity)
    u1 = (_splitmix64(key) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u2 = (_splitmix64(key ^ np.uint64(0x5DEECE66D)) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2)


def _catalogue_rows(stars: np.ndarray, mag_limit: float) -> np.ndarray:
    """Simulator stars → catalogue rows with deterministic measurement errors."""
    out = np.empty(len(stars), REFCAT_DTYPE)
    sid = stars["source_id"].astype(np.int64)
    out["source_id"] = sid
    sig_deg = POSITION_ERROR_MAS / 3.6e6
    cos_dec = np.maximum(np.cos(np.radians(stars["dec"])), 1e-6)
    out["dec"] = stars["dec"] + sig_deg * _hash_normal(sid, 0)
    out["ra"] = (stars["ra"] + sig_deg * _hash_normal(sid, 1) / cos_dec) % 360.0
    out["ra_err"] = POSITION_ERROR_MAS
    out["dec_err"] = POSITION_ERROR_MAS
    for j, band in enumerate(BANDS):
        mag = stars[band].astype(np.float64)
        err = np.clip(
            _MAG_ERR_MIN + 0.015 * 10 ** (0.4 * (mag - mag_limit)), _MAG_ERR_MIN, _MAG_ERR_MAX
        )
        out[band] = mag + err * _hash_normal(sid, 2 + j)
        out[f"{band}_err"] = err
    return out


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        Path(tmp).replace(dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RefcatStore:
    """A directory of HTM-sharded reference catalogue files.

    Parameters
    ----------
    root
        Directory of the catalogue (created on first ingest).
    level
        HTM level of the shards.
    """

    def __init__(self, root: str | os.PathLike[str], *, level: int = HTM_LEVEL) -> None:
        self.root = Path(root)
        self.level = level
        self._pix = HtmPixelization(level)
        meta = self._read_manifest()
        if meta is not None and (
            meta.get("pixelization") != "HTM" or int(meta.get("level", -1)) != level
        ):
            raise DetectorError(
                _STAGE,
                f"reference catalog at {self.root} is {meta.get('pixelization')} level "
                f"{meta.get('level')}, not HTM level {level}",
            )

    def __repr__(self) -> str:
        return f"RefcatStore({str(self.root)!r}, level={self.level})"

    @property
    def shard_dir(self) -> Path:
        """Directory holding the shard files."""
        return self.root / f"htm{self.level}"

    def shard_path(self, shard: int) -> Path:
        """File of one shard (whether it exists or not)."""
        return self.shard_dir / f"{shard}.npy"

    def shards_for(self, ra_deg: float, dec_deg: float, radius_deg: float) -> list[int]:
        """HTM trixels that may overlap a circle (a conservative envelope), ascending."""
        circle = Circle(
            UnitVector3d(LonLat.fromDegrees(ra_deg, dec_deg)), Angle.fromDegrees(radius_deg)
        )
        return [i for lo, hi in self._pix.envelope(circle) for i in range(lo, hi)]

    def existing_shards(self) -> list[int]:
        """Shards present on disk, ascending."""
        if not self.shard_dir.is_dir():
            return []
        return sorted(int(p.stem) for p in self.shard_dir.glob("*.npy") if p.stem.isdigit())

    def _read_manifest(self) -> dict[str, Any] | None:
        manifest = self.root / "refcat.json"
        try:
            meta: dict[str, Any] = json.loads(manifest.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise DetectorError(
                _STAGE, f"reference catalog manifest {manifest} is unreadable ({exc})"
            ) from exc
        return meta

    def _write_manifest(self, mag_limit: float | None = None) -> None:
        """Write ``refcat.json`` once; a later ingest must use the same magnitude limit."""
        meta = self._read_manifest()
        if meta is not None:
            have = meta.get("mag_limit")
            if mag_limit is not None and have is not None and float(have) != mag_limit:
                raise UserInputError(
                    f"reference catalog {self.root} was ingested to r = {have}; ingesting to "
                    f"{mag_limit} would mix depths; use another root"
                )
            return
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(
            {
                "pixelization": "HTM",
                "level": self.level,
                "format": "npy",
                "mag_limit": mag_limit,
                "dtype": [[n, REFCAT_DTYPE[n].str] for n in REFCAT_DTYPE.names or ()],
            },
            indent=1,
        )
        fd, tmp = tempfile.mkstemp(prefix=".refcat.json.", dir=self.root)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        Path(tmp).replace(self.root / "refcat.json")

    def ingest_region(
        self,
        sky: Sky,
        ra_deg: float,
        dec_deg: float,
        radius_deg: float,
        *,
        mag_limit: float = 21.0,
        overwrite: bool = False,
    ) -> list[int]:
        """Write every shard overlapping a circle that is not on disk yet.

        Each shard holds *all* the sky's stars inside its trixel with ``r ≤ mag_limit``,
        whatever the circle, so ingesting overlapping regions is consistent and idempotent.

        Parameters
        ----------
        sky
            The simulated sky (standing in for the Gaia source catalogue).
        ra_deg, dec_deg, radius_deg
            Region to cover, degrees.
        mag_limit
            Faintest r magnitude kept.
        overwrite
            Rewrite shards that already exist.

        Returns
        -------
        list of int
            The shards written by this call.

        Raises
        ------
        UserInputError
            The store was ingested with another ``mag_limit``.
        """
        self._write_manifest(mag_limit)
        written: list[int] = []
        for shard in self.shards_for(ra_deg, dec_deg, radius_deg):
            path = self.shard_path(shard)
            if path.exists() and not overwrite:
                continue
            tri = self._pix.triangle(shard)
            bc = tri.getBoundingCircle()
            centre = LonLat(bc.getCenter())
            radius = bc.getOpeningAngle().asDegrees() * 1.0001 + 1e-6
            stars = sky.stars(
                centre.getLon().asDegrees(), centre.getLat().asDegrees(), min(radius, 180.0)
            )
            if len(stars):
                inside = np.asarray(
                    tri.contains(np.radians(stars["ra"]), np.radians(stars["dec"])), bool
                )
                stars = stars[inside & (stars["r"] <= mag_limit)]
            rows = _catalogue_rows(stars, mag_limit)
            rows.sort(order="source_id")
            _atomic_save(path, rows)
            written.append(shard)
        return written

    def load_shard(self, shard: int) -> np.ndarray:
        """One shard's rows.

        Raises
        ------
        DetectorError
            The shard is missing or unreadable.
        """
        path = self.shard_path(shard)
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise DetectorError(
                _STAGE,
                f"no reference catalog shard {shard} (HTM level {self.level}) in {self.root}; "
                "run `ldf refcat ingest` for this region",
            ) from None
        except (OSError, ValueError) as exc:
            raise DetectorError(
                _STAGE, f"reference catalog shard {path} is unreadable ({exc}); re-ingest it"
            ) from exc
        if arr.dtype != REFCAT_DTYPE:
            raise DetectorError(
                _STAGE, f"reference catalog shard {path} has dtype {arr.dtype}; re-ingest it"
            )
        return arr

    def load_region(self, ra_deg: float, dec_deg: float, radius_deg: float) -> np.ndarray:
        """Catalogue rows within ``radius_deg`` of a position (array of :data:`REFCAT_DTYPE`).

        Raises
        ------
        DetectorError
            A shard the region needs is missing (``stage='astrometry'``): the operator runs
            ``ldf refcat ingest`` for the region.
        """
        shards = self.shards_for(ra_deg, dec_deg, radius_deg)
        missing = [s for s in shards if not self.shard_path(s).exists()]
        if missing:
            raise DetectorError(
                _STAGE,
                f"no reference catalog shard {', '.join(map(str, missing))} (HTM level "
                f"{self.level}) in {self.root} for RA {ra_deg:.5f}, Dec {dec_deg:.5f}, radius "
                f"{radius_deg:.4f}°; run `ldf refcat ingest` for this region",
            )
        parts = [self.load_shard(s) for s in shards]
        rows = np.concatenate(parts) if parts else np.empty(0, REFCAT_DTYPE)
        if len(rows):
            # A star exactly on a trixel edge could be in two shards.
            _, first = np.unique(rows["source_id"], return_index=True)
            rows = rows[np.sort(first)]
            rows = rows[angular_separation_deg(ra_deg, dec_deg, rows["ra"], rows["dec"])
                        <= radius_deg]  # fmt: skip
        return rows

    def copy_shards(self, shards: Iterable[int], dest: str | os.PathLike[str]) -> RefcatStore:
        """Copy shards (and the manifest) into another store, e.g. worker-local storage.

        Copies are atomic per file; shards already at the destination with the same size
        are skipped.

        Returns
        -------
        RefcatStore
            The destination store.

        Raises
        ------
        DetectorError
            A requested shard is not in this store.
        """
        target = RefcatStore(dest, level=self.level)
        self._write_manifest()
        target.root.mkdir(parents=True, exist_ok=True)
        if not (target.root / "refcat.json").exists():
            _atomic_copy(self.root / "refcat.json", target.root / "refcat.json")
        for shard in shards:
            src = self.shard_path(shard)
            if not src.exists():
                raise DetectorError(
                    _STAGE,
                    f"no reference catalog shard {shard} (HTM level {self.level}) in "
                    f"{self.root} to copy; run `ldf refcat ingest` for this region",
                )
            dst = target.shard_path(shard)
            if dst.exists() and dst.stat().st_size == src.stat().st_size:
                continue
            _atomic_copy(src, dst)
        return target
