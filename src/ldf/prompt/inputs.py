"""Where Prompt Processing's inputs live, and the preload of a visit's inputs on nextVisit.

Layout under ``$LDF_HOME`` (the facility's copies)::

    calibs/<instrument>/<detector>/bias.fits, dark.fits, flat-<band>.fits
    templates/<band>/patch_<ring>_<cell>.fits       (ldf.pipelines.templates.TemplateStore)
    refcat/refcat.json, refcat/htm7/<id>.npy        (ldf.pipelines.refcat.RefcatStore)
    apdb/apdb-config.yaml, apdb/apdb.sqlite3        (ldf.pipelines.apdb.PromptApdb)
    alerts/outbox/…                                 (ldf.pipelines.alertpacket.LocalAlertSink)

On ``nextVisit`` the :class:`Preloader` copies what each detector of the visit will need —
its master calibrations, the template patches under it, the reference-catalogue shards, and
the APDB's DiaObjects of the visit's region — into a per-visit scratch directory (the
worker-local storage), while the exposure is still being taken. A worker then reads only
local files; anything the preload could not find is recorded per detector, so the detector
fails at once with that reason when its raw arrives and the others are unaffected.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldf.errors import LdfError
from ldf.pipelines.refcat import angular_separation_deg
from ldf.pipelines.types import DetectorError

__all__ = [
    "HISTORY_DIR",
    "InputPaths",
    "Preloader",
    "calib_filename",
    "load_snapshot",
]

HISTORY_DIR = "apdb-history"
"""Scratch sub-directory of a visit's APDB history snapshot."""


def load_snapshot(directory: str | Path) -> Any:
    """A preloaded APDB history (``ApdbHistory``) from a visit's scratch directory."""
    import pandas as pd

    from ldf.pipelines.apdb import ApdbHistory

    d = Path(directory)
    return ApdbHistory(
        *(pd.read_parquet(d / f"{n}.parquet") for n in ("objects", "sources", "forced"))
    )


def calib_filename(kind: str, band: str | None = None) -> str:
    """File name of a master calibration: 'bias.fits', 'dark.fits', 'flat-r.fits'."""
    if kind == "flat":
        if not band:
            raise ValueError("a flat needs a band")
        return f"flat-{band}.fits"
    return f"{kind}.fits"


@dataclass(frozen=True)
class InputPaths:
    """The roots of the inputs (the facility's, or a visit's scratch copy)."""

    root: Path

    @property
    def calibs(self) -> Path:
        """Master calibrations."""
        return self.root / "calibs"

    @property
    def templates(self) -> Path:
        """Template coadds."""
        return self.root / "templates"

    @property
    def refcat(self) -> Path:
        """Reference catalogue shards."""
        return self.root / "refcat"

    @property
    def apdb(self) -> Path:
        """APDB config and (SQLite) database."""
        return self.root / "apdb"

    @property
    def apdb_config(self) -> Path:
        """dax_apdb configuration file."""
        return self.apdb / "apdb-config.yaml"

    @property
    def alerts(self) -> Path:
        """Local alert sink (until the distribution service takes alerts)."""
        return self.root / "alerts" / "outbox"

    def prewarped(self, detector: str, band: str) -> Path:
        """A detector's template warped onto its predicted grid (a visit's scratch only)."""
        return self.root / "prewarped" / f"{detector}-{band}"

    def calib(self, instrument: str, detector: str, kind: str, band: str | None = None) -> Path:
        """Path of one master calibration."""
        return self.calibs / instrument / detector / calib_filename(kind, band)


def _copy(src: Path, dest: Path) -> None:
    """Copy a file to a temporary name and rename it (a reader never sees half a file)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dest)


class Preloader:
    """Copies one visit's inputs into worker-local scratch (see the module docstring).

    Parameters
    ----------
    home
        The facility's input roots.
    scratch_root
        Where per-visit scratch directories are made.
    """

    def __init__(self, home: Path, scratch_root: Path) -> None:
        self.home = InputPaths(home)
        self.scratch_root = scratch_root

    def scratch_for(self, exposure_id: int) -> Path:
        """The scratch directory of a visit."""
        return self.scratch_root / str(exposure_id)

    def preload(
        self,
        visit: Any,
        detectors: list[str],
        *,
        camera_scale: float = 1.0,
    ) -> dict[str, Any]:
        """Copy what each detector of ``visit`` (a NextVisit) needs; report what is missing.

        Returns
        -------
        dict
            ``{"seconds": …, "detectors": {name: {"missing": [reasons…]}}, "apdb_objects": n}``
        """
        from ldf.sim.instruments import get_instrument
        from ldf.sim.wcs import detector_wcs

        t0 = time.monotonic()
        scratch = InputPaths(self.scratch_for(visit.exposure_id))
        scratch.root.mkdir(parents=True, exist_ok=True)
        camera = get_instrument(visit.instrument, camera_scale)
        report: dict[str, Any] = {"detectors": {}}
        for name in detectors:
            missing: list[str] = []
            kinds: list[tuple[str, str | None]] = [("bias", None)]
            if visit.obs_type != "bias":
                kinds.append(("dark", None))
            if visit.obs_type in ("science", "engtest", "flat") and visit.band:
                kinds.append(("flat", visit.band))
            for kind, band in kinds:
                src = self.home.calib(visit.instrument, name, kind, band)
                if src.exists():
                    _copy(src, scratch.calib(visit.instrument, name, kind, band))
                elif visit.obs_type == "science":
                    what = f"{band}-band flat" if kind == "flat" else kind
                    missing.append(
                        f"no master {what} for {name}; build one with `ldf calibs build`"
                    )
            report["detectors"][name] = {"missing": missing}
        if visit.is_science and visit.band:
            detector_objs = [camera.detector(n) for n in detectors]
            wcss = [
                detector_wcs(camera, d, visit.ra_deg, visit.dec_deg, visit.rot_sky_deg)
                for d in detector_objs
            ]
            self._preload_templates(visit, detector_objs, wcss, scratch, report)
            self._preload_refcat(visit, camera, detector_objs, wcss, scratch, report)
            self._preload_history(visit, camera, detector_objs, wcss, scratch, report)
        report["seconds"] = round(time.monotonic() - t0, 3)
        return report

    def _preload_templates(
        self, visit: Any, dets: list[Any], wcss: list[Any], scratch: InputPaths, report: dict
    ) -> None:
        from ldf.pipelines.templates import TemplateStore

        store = TemplateStore(self.home.templates)
        for det, wcs in zip(dets, wcss, strict=True):
            try:
                patches = store.patches_for(visit.band, wcs, (det.ny, det.nx))
                store.copy_patches(visit.band, patches, scratch.templates)
            except (DetectorError, LdfError, OSError) as exc:
                report["detectors"][det.name]["missing"].append(str(exc))

    def _preload_refcat(
        self,
        visit: Any,
        camera: Any,
        dets: list[Any],
        wcss: list[Any],
        scratch: InputPaths,
        report: dict,
    ) -> None:
        from ldf.pipelines.refcat import RefcatStore

        store = RefcatStore(self.home.refcat)
        for det, wcs in zip(dets, wcss, strict=True):
            ra, dec = (float(v) for v in wcs.wcs_pix2world((det.nx - 1) / 2, (det.ny - 1) / 2, 0))
            radius = math.hypot(det.nx, det.ny) / 2 * camera.pixel_scale_arcsec / 3600 + 0.01
            try:
                shards = store.shards_for(ra, dec, radius)
                store.copy_shards(shards, scratch.refcat)
            except (DetectorError, LdfError, OSError) as exc:
                report["detectors"][det.name]["missing"].append(str(exc))

    def _preload_history(
        self,
        visit: Any,
        camera: Any,
        dets: list[Any],
        wcss: list[Any],
        scratch: InputPaths,
        report: dict,
    ) -> None:
        """Snapshot the APDB's DiaObjects (and their 12-month history) of the visit's region."""
        from astropy.time import Time

        from ldf.pipelines.apdb import PromptApdb

        if not self.home.apdb_config.exists():
            return
        ra, dec = visit.ra_deg, visit.dec_deg
        radius = 0.0
        for det, wcs in zip(dets, wcss, strict=True):
            cra, cdec = (float(v) for v in wcs.wcs_pix2world((det.nx - 1) / 2, (det.ny - 1) / 2, 0))
            half = math.hypot(det.nx, det.ny) / 2 * camera.pixel_scale_arcsec / 3600
            radius = max(radius, float(angular_separation_deg(ra, dec, cra, cdec)) + half)
        radius += 0.01
        when = visit.start_tai_mjd
        t = Time(when, format="mjd", scale="tai") if when is not None else Time.now()
        taken = time.time()
        try:
            history = PromptApdb.open(self.home.apdb_config).load_history(ra, dec, radius, t)
        except LdfError as exc:  # the worker queries the APDB itself (and handles outages)
            report["apdb_history"] = f"not preloaded: {exc}"
            return
        out = scratch.root / HISTORY_DIR
        out.mkdir(parents=True, exist_ok=True)
        for name, frame in zip(("objects", "sources", "forced"), history, strict=True):
            tmp = out / f".{name}.parquet.tmp"
            frame.to_parquet(tmp)
            tmp.replace(out / f"{name}.parquet")
        meta = {"taken_unix": taken, "ra": ra, "dec": dec, "radius_deg": radius}
        (out / ".snapshot.json.tmp").write_text(json.dumps(meta))
        (out / ".snapshot.json.tmp").replace(out / "snapshot.json")
        report["apdb_history"] = {"objects": len(history.objects), **meta}

    def cleanup(self, exposure_id: int) -> None:
        """Remove a visit's scratch directory (after all its detectors are done)."""
        shutil.rmtree(self.scratch_for(exposure_id), ignore_errors=True)
