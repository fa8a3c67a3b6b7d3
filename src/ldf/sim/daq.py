"""The camera data acquisition system (DAQ) as the archiver sees it.

Rubin's camera reads each CCD's 16 amplifiers into the DAQ's memory, and the archiver pulls
them from there after ``endReadout``. Ours keeps the same shape on local disk::

    <root>/<instrument>/<day_obs>/<obs_id>/
        <detector>.raw        the amplifiers' raw pixels, one after the other, int32, as read out
        <detector>.json       the detector manifest: amplifier names, shapes, offsets, checksum
        exposure.json         the completion signal: the visit and every detector read out

Every file is written under a temporary name and renamed, so a reader never sees a half
file. ``exposure.json`` is written last: its presence means the readout is complete. A
detector the camera failed to read is absent from ``exposure.json``'s ``detectors`` but listed
in ``expected`` — the archiver decides what to do about it.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ldf.errors import NotFoundError, StorageError, UserInputError
from ldf.sim.models import VisitSpec

__all__ = ["AmpSegment", "DaqStore", "DetectorManifest", "ExposureManifest"]

RAW_DTYPE = np.dtype("<i4")
"""The DAQ delivers 18-bit ADC values in 32-bit little-endian words."""


class AmpSegment(BaseModel):
    """Where one amplifier's pixels are in a detector's raw file."""

    model_config = ConfigDict(frozen=True)

    name: str
    rows: int
    cols: int
    offset: int = Field(description="Byte offset in the .raw file.")


class DetectorManifest(BaseModel):
    """What the DAQ holds for one detector of one exposure."""

    model_config = ConfigDict(frozen=True)

    detector: str
    dtype: str = RAW_DTYPE.str
    amps: tuple[AmpSegment, ...]
    nbytes: int
    adler32: int = Field(description="Adler-32 of the .raw file (as Rubin and Rucio use).")


class ExposureManifest(BaseModel):
    """The completion signal of one exposure's readout."""

    model_config = ConfigDict(frozen=True)

    visit: VisitSpec
    expected: tuple[str, ...] = Field(description="Detectors the camera was asked to read.")
    detectors: tuple[str, ...] = Field(description="Detectors actually read out.")
    end_readout_tai_mjd: float
    scale: float = Field(
        default=1.0, description="Pixel scale of the simulated camera (1 = real LSSTCam size)."
    )


def _atomic_write(path: Path, write: Any, mode: str = "wb") -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc


class DaqStore:
    """The DAQ's pixel store for all instruments, rooted at one directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def exposure_dir(self, instrument: str, day_obs: int, obs_id: str) -> Path:
        """Directory of one exposure."""
        return self.root / instrument / str(day_obs) / obs_id

    def write_detector(
        self, visit: VisitSpec, detector: str, amps: Mapping[str, np.ndarray]
    ) -> DetectorManifest:
        """Store one detector's amplifiers (raw, as read out) and its manifest."""
        if not amps:
            raise UserInputError(f"{visit.obs_id} {detector}: no amplifiers to write")
        d = self.exposure_dir(visit.instrument, visit.day_obs, visit.obs_id)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {d}: {exc.strerror}") from exc
        segments = []
        offset = 0
        checksum = 1
        arrays = []
        for name, arr in amps.items():
            a = np.ascontiguousarray(arr, dtype=RAW_DTYPE)
            if a.ndim != 2:
                raise UserInputError(f"{detector} amp {name}: expected 2-d pixels, got {a.shape}")
            segments.append(AmpSegment(name=name, rows=a.shape[0], cols=a.shape[1], offset=offset))
            offset += a.nbytes
            checksum = zlib.adler32(memoryview(a).cast("B"), checksum)
            arrays.append(a)

        def write_raw(f: Any) -> None:
            for a in arrays:
                a.tofile(f)

        _atomic_write(d / f"{detector}.raw", write_raw)
        manifest = DetectorManifest(
            detector=detector, amps=tuple(segments), nbytes=offset, adler32=checksum
        )
        _atomic_write(
            d / f"{detector}.json", lambda f: f.write(manifest.model_dump_json(indent=1)), "w"
        )
        return manifest

    def complete(
        self,
        visit: VisitSpec,
        expected: list[str],
        detectors: list[str],
        end_readout_mjd: float,
        scale: float = 1.0,
    ) -> ExposureManifest:
        """Signal the end of readout: write ``exposure.json`` (last, atomically)."""
        d = self.exposure_dir(visit.instrument, visit.day_obs, visit.obs_id)
        missing = [det for det in detectors if not (d / f"{det}.json").exists()]
        if missing:
            raise StorageError(f"{visit.obs_id}: detectors not in the DAQ: {', '.join(missing)}")
        manifest = ExposureManifest(
            visit=visit,
            expected=tuple(expected),
            detectors=tuple(detectors),
            end_readout_tai_mjd=end_readout_mjd,
            scale=scale,
        )
        d.mkdir(parents=True, exist_ok=True)
        _atomic_write(
            d / "exposure.json", lambda f: f.write(manifest.model_dump_json(indent=1)), "w"
        )
        return manifest

    def exposure(self, instrument: str, day_obs: int, obs_id: str) -> ExposureManifest:
        """The completion manifest of an exposure; NotFoundError until readout completes."""
        path = self.exposure_dir(instrument, day_obs, obs_id) / "exposure.json"
        try:
            return ExposureManifest.model_validate_json(path.read_text())
        except FileNotFoundError:
            raise NotFoundError(f"{obs_id}: no completed readout in the DAQ") from None

    def exposures(self, instrument: str, day_obs: int) -> Iterator[ExposureManifest]:
        """Completed exposures of a day, in sequence order."""
        d = self.root / instrument / str(day_obs)
        if not d.is_dir():
            return
        for sub in sorted(d.iterdir()):
            if (sub / "exposure.json").exists():
                yield ExposureManifest.model_validate_json((sub / "exposure.json").read_text())

    def read_detector(
        self, instrument: str, day_obs: int, obs_id: str, detector: str, *, verify: bool = True
    ) -> dict[str, np.ndarray]:
        """Read one detector's amplifiers back (checksum verified)."""
        d = self.exposure_dir(instrument, day_obs, obs_id)
        try:
            manifest = DetectorManifest.model_validate_json((d / f"{detector}.json").read_text())
            raw = np.fromfile(d / f"{detector}.raw", dtype=np.dtype(manifest.dtype))
        except FileNotFoundError:
            raise NotFoundError(f"{obs_id} {detector}: not in the DAQ") from None
        if raw.nbytes != manifest.nbytes:
            raise StorageError(
                f"{obs_id} {detector}: {raw.nbytes} bytes in the DAQ, manifest says "
                f"{manifest.nbytes} (truncated readout)"
            )
        if verify and zlib.adler32(memoryview(raw).cast("B")) != manifest.adler32:
            raise StorageError(f"{obs_id} {detector}: checksum mismatch (corrupt readout)")
        out = {}
        for seg in manifest.amps:
            start = seg.offset // raw.itemsize
            out[seg.name] = raw[start : start + seg.rows * seg.cols].reshape(seg.rows, seg.cols)
        return out

    def has_detector(self, instrument: str, day_obs: int, obs_id: str, detector: str) -> bool:
        """Whether a detector's readout is in the DAQ (e.g. one that arrived late)."""
        return (self.exposure_dir(instrument, day_obs, obs_id) / f"{detector}.json").exists()

    def salvage_detector(
        self, instrument: str, day_obs: int, obs_id: str, detector: str
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        """Read what there is of a damaged readout: amplifiers and a list of problems.

        A checksum mismatch keeps the pixels as read; a truncated file keeps the whole
        amplifiers and zero-fills the rest (each named in the problems), so the archiver can
        still archive the exposure with what is known, flagged.
        """
        d = self.exposure_dir(instrument, day_obs, obs_id)
        try:
            manifest = DetectorManifest.model_validate_json((d / f"{detector}.json").read_text())
            raw = np.fromfile(d / f"{detector}.raw", dtype=np.dtype(manifest.dtype))
        except FileNotFoundError:
            raise NotFoundError(f"{obs_id} {detector}: not in the DAQ") from None
        problems = []
        if raw.nbytes != manifest.nbytes:
            problems.append(f"readout truncated: {raw.nbytes} of {manifest.nbytes} bytes")
        elif zlib.adler32(memoryview(raw).cast("B")) != manifest.adler32:
            problems.append("readout checksum mismatch: pixel data corrupt")
        out = {}
        for seg in manifest.amps:
            start = seg.offset // raw.itemsize
            n = seg.rows * seg.cols
            part = raw[start : start + n]
            if part.size < n:
                problems.append(
                    f"amplifier {seg.name}: {part.size} of {n} pixels, rest zero-filled"
                )
                part = np.concatenate([part, np.zeros(n - part.size, dtype=raw.dtype)])
            out[seg.name] = part.reshape(seg.rows, seg.cols)
        return out, problems
