"""Raw multi-extension FITS files as Rubin's cameras write them.

One file per detector of one exposure: a primary HDU with no pixels and the exposure's
standard keywords, then one image HDU per amplifier in readout order (EXTNAME ``Segment10`` …
``Segment00``), int32 pixels untrimmed (prescan, data, serial and parallel overscan), with
the geometry keywords of ``obs_lsst`` raws (DATASEC, BIASSEC, DETSEC with flips as reversed
ranges, DTV1/DTV2/DTM1_1/DTM2_2).

The archiver builds a file from the camera's ``endReadout`` metadata and the DAQ's pixels::

    visit, problems = check_metadata(event_visit_payload)
    hdul = build_hdulist(instrument, detector, visit, amps, problems=problems)
    write_raw(directory / raw_filename(visit, detector.name), hdul)

Metadata that is missing or malformed does not stop archiving (the pixels are irreplaceable):
:func:`check_metadata` builds the best :class:`~ldf.sim.models.VisitSpec` it can and lists
every :class:`HeaderProblem`; the header then carries ``LDF FLAGGED = T`` and one
``LDF PROBLEM<n>`` card per problem, and keywords whose value is unknown (RA, DEC, ROTPA,
AZSTART, ELSTART, AMSTART) are written undefined rather than with a made-up number. Only the
identity (instrument, day_obs, seq_num) is indispensable: without it a file has no name.

Every keyword :meth:`ldf.butler.records.RawRecord.from_header` reads is written, so a file
round-trips into the Butler.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.time import Time
from pydantic import ValidationError

from ldf.errors import StorageError, StorageFullError, UserInputError
from ldf.sim.instruments import Amplifier, Detector, Instrument
from ldf.sim.models import OBS_ID_PREFIX, ObsType, VisitSpec

__all__ = [
    "HeaderProblem",
    "build_hdulist",
    "check_metadata",
    "primary_header",
    "raw_filename",
    "write_raw",
]

READOUT_S = 2.0
"""Seconds between the end of integration and the end of readout (LSSTCam reads in 2 s)."""

MAX_EXPOSURE_S = 3600.0
"""Longest exposure or dark time taken as real; longer ones are flagged as implausible."""

RICE_TILE_ROWS = 256
"""Rows per compression tile (full amplifier width); fpack's one-row tiles compress 3× slower."""

TELESCOPES = {"LSSTCam": "Simonyi Survey Telescope", "LATISS": "Rubin Auxiliary Telescope"}
"""TELESCOP of each instrument, as Rubin writes it."""

_FIELD_KEYWORDS = {
    "instrument": "INSTRUME",
    "day_obs": "DAYOBS",
    "seq_num": "SEQNUM",
    "obs_type": "IMGTYPE",
    "reason": "REASON",
    "program": "PROGRAM",
    "group_id": "GROUPID",
    "band": "FILTBAND",
    "physical_filter": "FILTER",
    "ra_deg": "RA",
    "dec_deg": "DEC",
    "rot_sky_deg": "ROTPA",
    "alt_deg": "ELSTART",
    "az_deg": "AZSTART",
    "airmass": "AMSTART",
    "exp_time_s": "EXPTIME",
    "dark_time_s": "DARKTIME",
    "start_tai_mjd": "MJD-BEG",
    "conditions": "CONDITIONS",
}
# VisitSpec field → header keyword its value goes to (and the name of its problems).

_UNKNOWABLE = frozenset({"RA", "DEC", "ROTPA", "ELSTART", "AZSTART", "AMSTART"})
# Keywords written undefined when their value is flagged: a placeholder number here would
# silently mislead (a wrong pointing), while RawRecord and the Butler accept None for them.

_MEASURED = ("rot_sky_deg", "alt_deg", "az_deg", "airmass")
# Fields with a model default that is nevertheless a measurement: absence is a problem.

_IMGTYPES = {
    ObsType.SCIENCE: "OBJECT",
    ObsType.BIAS: "BIAS",
    ObsType.DARK: "DARK",
    ObsType.FLAT: "FLAT",
    ObsType.ENGTEST: "ENGTEST",
}
# Rubin's IMGTYPE spelling (RawRecord maps OBJECT back to 'science').

_CARD_WIDTH = 80


@dataclass(frozen=True)
class HeaderProblem:
    """One thing wrong with the metadata of an exposure, recorded in its file's header."""

    keyword: str
    """Header keyword concerned ('RA', 'EXPTIME', 'SEQNUM', …)."""
    problem: str
    """What is wrong, e.g. 'missing' or 'not a number: abc'."""

    def __str__(self) -> str:
        return f"{self.keyword}: {self.problem}"


# ------------------------------------------------------------------------------- metadata


def check_metadata(
    meta: Mapping[str, Any], *, end_readout_tai_mjd: float | None = None
) -> tuple[VisitSpec | None, list[HeaderProblem]]:
    """The best visit that can be built from an ``endReadout`` payload, and its problems.

    Never raises for bad metadata. Missing or malformed fields are replaced by placeholders
    (see below) and each is reported; a payload's ``obs_id``/``exposure_id`` that disagree
    with its identity are reported too.

    Placeholders: IMGTYPE 'engtest', REASON 'unknown', GROUPID the obs_id, EXPTIME and
    DARKTIME each other (else 0), MJD-BEG from ``end_readout_tai_mjd`` (else now), pointing
    and airmass the model defaults (written undefined by :func:`primary_header`), filter and
    conditions None.

    Parameters
    ----------
    meta
        The ``visit`` of an ``endReadout`` event (``VisitSpec.model_dump(mode='json')``).
    end_readout_tai_mjd
        When readout ended (TAI MJD), to estimate a missing start time.

    Returns
    -------
    tuple
        ``(visit, problems)``; ``visit`` is None when instrument, day_obs or seq_num is
        missing or invalid, since the file could not be named.
    """
    problems: list[HeaderProblem] = []
    if not isinstance(meta, Mapping):
        return None, [HeaderProblem("VISIT", f"not a mapping: {type(meta).__name__}")]
    identity = _check_identity(meta, problems)
    data: dict[str, Any] = {k: meta[k] for k in _FIELD_KEYWORDS if k in meta}
    # Without a full identity, still look at the rest so the report lists everything at once.
    data.update({"instrument": "LSSTCam", "day_obs": 19700101, "seq_num": 1} | identity)
    known_day = "day_obs" in identity
    for name in _MEASURED:
        if name not in meta:
            problems.append(HeaderProblem(_FIELD_KEYWORDS[name], "missing"))
    bad: set[str] = set()
    visit: VisitSpec | None = None
    for _ in range(len(_FIELD_KEYWORDS) + 1):
        try:
            visit = VisitSpec.model_validate(data)
        except ValidationError as exc:
            newly_bad = _record_errors(exc, problems)
        else:
            newly_bad = _implausible(visit, problems, check_day=known_day)
            if not newly_bad:
                break
        bad |= newly_bad
        for name in newly_bad:
            data[name] = _placeholder(name, data, bad, end_readout_tai_mjd)
    else:  # pragma: no cover - each pass replaces at least one field by a valid placeholder
        return None, [*problems, HeaderProblem("VISIT", "could not build a visit")]
    if visit is None or len(identity) < 3:
        return None, problems
    if not ({"exp_time_s", "dark_time_s"} & bad) and visit.dark_time_s < visit.exp_time_s:
        problems.append(HeaderProblem("DARKTIME", f"{visit.dark_time_s} s is shorter than EXPTIME"))
    for key, expected in (("obs_id", visit.obs_id), ("exposure_id", visit.exposure_id)):
        if key in meta and meta[key] != expected:
            keyword = "OBSID" if key == "obs_id" else "EXPID"
            problems.append(
                HeaderProblem(keyword, f"payload says {meta[key]!r}, identity gives {expected}")
            )
    return visit, problems


def _check_identity(meta: Mapping[str, Any], problems: list[HeaderProblem]) -> dict[str, Any]:
    """The valid identity fields of ``meta`` (all three when the file can be named)."""
    found: dict[str, Any] = {}
    instrument = meta.get("instrument")
    if instrument is None:
        problems.append(HeaderProblem("INSTRUME", "missing"))
    elif not isinstance(instrument, str) or instrument not in OBS_ID_PREFIX:
        problems.append(HeaderProblem("INSTRUME", f"unknown instrument: {instrument!r}"))
    else:
        found["instrument"] = instrument
    day_obs = _as_int(meta.get("day_obs"))
    if "day_obs" not in meta or meta["day_obs"] is None:
        problems.append(HeaderProblem("DAYOBS", "missing"))
    elif day_obs is None or not _valid_day_obs(day_obs):
        problems.append(HeaderProblem("DAYOBS", f"not a date YYYYMMDD: {meta['day_obs']!r}"))
    else:
        found["day_obs"] = day_obs
    seq_num = _as_int(meta.get("seq_num"))
    if "seq_num" not in meta or meta["seq_num"] is None:
        problems.append(HeaderProblem("SEQNUM", "missing"))
    elif seq_num is None or not 0 < seq_num < 100000:
        problems.append(HeaderProblem("SEQNUM", f"not in 1..99999: {meta['seq_num']!r}"))
    else:
        found["seq_num"] = seq_num
    return found


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _valid_day_obs(day_obs: int) -> bool:
    try:
        datetime.strptime(str(day_obs), "%Y%m%d")
    except ValueError:
        return False
    return len(str(day_obs)) == 8


def _record_errors(exc: ValidationError, problems: list[HeaderProblem]) -> set[str]:
    bad: set[str] = set()
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else "visit"
        if name not in _FIELD_KEYWORDS or name in bad:
            continue
        bad.add(name)
        where = ".".join(str(p) for p in err["loc"][1:])
        text = _describe(err)
        problems.append(HeaderProblem(_FIELD_KEYWORDS[name], f"{where}: {text}" if where else text))
    return bad


def _describe(err: Mapping[str, Any]) -> str:
    kind, value = err["type"], err.get("input")
    if kind == "missing":
        return "missing"
    if kind in ("float_parsing", "float_type", "int_parsing", "int_type", "int_from_float"):
        return f"not a number: {value}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"out of range: {value} ({err['msg'].lower()})"
    return f"{err['msg'].lower()}: {value!r}"


def _implausible(visit: VisitSpec, problems: list[HeaderProblem], *, check_day: bool) -> set[str]:
    bad = set()
    for name in _FIELD_KEYWORDS:
        value = getattr(visit, name)
        if isinstance(value, float) and not math.isfinite(value):
            bad.add(name)
            problems.append(HeaderProblem(_FIELD_KEYWORDS[name], f"not finite: {value}"))
    for name in ("exp_time_s", "dark_time_s"):
        value = getattr(visit, name)
        if name not in bad and value > MAX_EXPOSURE_S:
            bad.add(name)
            problems.append(HeaderProblem(_FIELD_KEYWORDS[name], f"implausibly long: {value} s"))
    if check_day and "start_tai_mjd" not in bad:
        # day_obs runs from noon to noon (UTC-12h); allow a day of slack either side.
        noon = _day_obs_noon_mjd(visit.day_obs)
        if not noon - 1.0 <= visit.start_tai_mjd <= noon + 2.0:
            bad.add("start_tai_mjd")
            problems.append(
                HeaderProblem("MJD-BEG", f"{visit.start_tai_mjd} is not on day_obs {visit.day_obs}")
            )
    return bad


def _day_obs_noon_mjd(day_obs: int) -> float:
    day = datetime.strptime(str(day_obs), "%Y%m%d")
    return float((day - datetime(1858, 11, 17)).days) + 0.5  # MJD 0 = 1858-11-17


def _placeholder(name: str, data: dict[str, Any], bad: set[str], end_readout: float | None) -> Any:
    def good_float(field: str) -> float | None:
        value = data.get(field)
        if field in bad or isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if 0 <= value <= MAX_EXPOSURE_S else None

    if name == "exp_time_s":
        return good_float("dark_time_s") or 0.0
    if name == "dark_time_s":
        return good_float("exp_time_s") or 0.0
    if name == "start_tai_mjd":
        if end_readout is not None and math.isfinite(end_readout):
            dark = good_float("dark_time_s") or good_float("exp_time_s") or 0.0
            return end_readout - (dark + READOUT_S) / 86400.0
        return float(Time.now().tai.mjd)
    if name == "group_id":
        prefix = OBS_ID_PREFIX.get(str(data.get("instrument")), "XX")
        return f"{prefix}_O_{data.get('day_obs')}_{_as_int(data.get('seq_num')) or 0:06d}"
    placeholders: dict[str, Any] = {
        "obs_type": ObsType.ENGTEST,
        "reason": "unknown",
        "program": "",
        "band": None,
        "physical_filter": None,
        "ra_deg": 0.0,
        "dec_deg": 0.0,
        "rot_sky_deg": 0.0,
        "alt_deg": 90.0,
        "az_deg": 0.0,
        "airmass": 1.0,
        "conditions": None,
    }
    return placeholders[name]


# ------------------------------------------------------------------------------- headers


def primary_header(
    instrument: Instrument,
    detector: Detector,
    visit: VisitSpec,
    *,
    problems: Sequence[HeaderProblem] = (),
    end_readout_tai_mjd: float | None = None,
) -> fits.Header:
    """The primary header of one detector's raw file, with Rubin's standard keywords.

    Parameters
    ----------
    instrument, detector
        The camera and the CCD the file is for.
    visit
        The exposure (from :func:`check_metadata` or the scheduler).
    problems
        Metadata problems: the header is flagged (``LDF FLAGGED``, ``LDF PROBLEM<n>``) and
        unknowable keywords (pointing, airmass) are written undefined.
    end_readout_tai_mjd
        End of readout (TAI MJD), written as ``LDF READEND`` when given.

    Raises
    ------
    UserInputError
        The visit is for another instrument, or the detector is not the instrument's.
    NotFoundError
        The instrument has no detector of that name.
    """
    if visit.instrument != instrument.name:
        raise UserInputError(
            f"visit {visit.obs_id} is for {visit.instrument}, not {instrument.name}"
        )
    if instrument.detector(detector.name) != detector:  # NotFoundError for an unknown name
        raise UserInputError(
            f"detector {detector.name} is not {instrument.name}'s at scale {instrument.scale}"
        )
    unknown = {p.keyword for p in problems} & _UNKNOWABLE

    def maybe(keyword: str, value: float) -> float | None:
        return None if keyword in unknown else value

    begin = Time(visit.start_tai_mjd, format="mjd", scale="tai", precision=3)
    end = Time(visit.end_tai_mjd, format="mjd", scale="tai", precision=3)
    now = Time.now().tai
    now.precision = 3
    ra, dec = maybe("RA", visit.ra_deg), maybe("DEC", visit.dec_deg)
    filter_name, grating = _filter_and_grating(instrument, visit.physical_filter)
    cards: list[tuple[str, Any, str]] = [
        ("ORIGIN", "ldf archiver", "Organization that wrote the file"),
        ("DATE", now.isot, "File creation date (TAI)"),
        ("TIMESYS", "TAI", "Time scale of all dates in this header"),
        ("TELESCOP", TELESCOPES.get(instrument.name, instrument.name), "Telescope"),
        ("INSTRUME", instrument.name, "Instrument"),
        ("CAMCODE", instrument.obs_id_prefix, "Camera code of the obs id"),
        ("CONTRLLR", "O", "Controller: O = OCS-driven"),
        ("DAYOBS", str(visit.day_obs), "Observing day YYYYMMDD"),
        ("SEQNUM", visit.seq_num, "Sequence number within the day"),
        ("OBSID", visit.obs_id, "Observation id"),
        ("GROUPID", _ascii(visit.group_id), "Group of exposures"),
        ("IMGTYPE", _IMGTYPES[visit.obs_type], "Observation type"),
        ("REASON", _ascii(visit.reason), "Observation reason"),
        ("PROGRAM", _ascii(visit.program), "Science program"),
        ("OBJECT", _object_name(visit, ra, dec), "Target"),
        ("EXPTIME", visit.exp_time_s, "[s] Requested exposure time"),
        ("SHUTTIME", visit.exp_time_s, "[s] Shutter open time"),
        ("DARKTIME", visit.dark_time_s, "[s] Time from CCD clear to readout"),
        ("DATE-OBS", begin.isot, "Start of integration (TAI)"),
        ("DATE-BEG", begin.isot, "Start of integration (TAI)"),
        ("MJD-BEG", visit.start_tai_mjd, "Start of integration (TAI MJD)"),
        ("DATE-END", end.isot, "End of integration (TAI)"),
        ("MJD-END", visit.end_tai_mjd, "End of integration (TAI MJD)"),
        ("FILTER", filter_name, "Filter in the beam"),
    ]
    if grating is not None:
        cards.append(("GRATING", grating, "Disperser in the beam"))
    cards += [
        ("FILTBAND", None if visit.band is None else _ascii(visit.band), "Band of the filter"),
        ("RA", ra, "[deg] Boresight ICRS right ascension"),
        ("DEC", dec, "[deg] Boresight ICRS declination"),
        ("ROTPA", maybe("ROTPA", visit.rot_sky_deg), "[deg] Sky rotation angle"),
        ("RASTART", ra, "[deg] Right ascension at start"),
        ("DECSTART", dec, "[deg] Declination at start"),
        ("AZSTART", maybe("AZSTART", visit.az_deg), "[deg] Azimuth at start"),
        ("ELSTART", maybe("ELSTART", visit.alt_deg), "[deg] Elevation at start"),
        ("AMSTART", maybe("AMSTART", visit.airmass), "Airmass at start"),
        ("RAFTBAY", detector.raft, "Raft bay"),
        ("CCDSLOT", detector.sensor, "Sensor slot in the raft"),
        ("DETECTOR", detector.id, "Detector id"),
        ("DETSIZE", f"[1:{detector.nx},1:{detector.ny}]", "Size of the assembled image"),
        ("CCD_MANU", detector.vendor, "CCD manufacturer"),
        ("CCD_TYPE", _ccd_type(detector), "CCD model"),
        ("LSST_NUM", detector.serial, "CCD serial number"),
        ("SIMULATE", True, "Simulated data"),
    ]
    header = fits.Header(cards)
    if visit.conditions is not None:
        cond = visit.conditions
        # Not Rubin keywords (Rubin's header has no truth of the atmosphere): HIERARCH SIM.
        header["HIERARCH SIM SEEING"] = (round(cond.seeing_fwhm_arcsec, 4), "[arcsec] FWHM")
        header["HIERARCH SIM SKYMAG"] = (round(cond.sky_mag_arcsec2, 4), "[mag/arcsec2]")
        header["HIERARCH SIM TRANSP"] = (round(cond.transparency, 4), "transparency")
        header["HIERARCH SIM MOONILL"] = (round(cond.moon_illumination, 4), "moon phase")
        header["HIERARCH SIM MOONALT"] = (round(cond.moon_alt_deg, 4), "[deg]")
        header["HIERARCH SIM PNTDRA"] = (cond.pointing_dra_arcsec, "[arcsec] true-cmd east")
        header["HIERARCH SIM PNTDDEC"] = (cond.pointing_ddec_arcsec, "[arcsec] true-cmd north")
    if end_readout_tai_mjd is not None:
        header["HIERARCH LDF READEND"] = (end_readout_tai_mjd, "end of readout TAI MJD")
    if problems:
        header["HIERARCH LDF FLAGGED"] = (True, "metadata problems below")
        for n, problem in enumerate(problems, start=1):
            key = f"HIERARCH LDF PROBLEM{n}"
            header[key] = _fit_card_value(key, _ascii(str(problem)))
    return header


def _filter_and_grating(instrument: Instrument, physical_filter: str | None) -> tuple[str, Any]:
    name = _ascii(physical_filter) if physical_filter else "unknown"
    if not instrument.dispersers:
        return name, None
    # LATISS reports its filter wheel and its grating wheel separately ('filter~grating').
    filt, _, grating = name.partition("~")
    return filt, grating or "empty"


def _object_name(visit: VisitSpec, ra: float | None, dec: float | None) -> str:
    # VisitSpec carries no target name: on-sky exposures get a position-derived name.
    if visit.obs_type in (ObsType.BIAS, ObsType.DARK, ObsType.FLAT) or ra is None or dec is None:
        return _IMGTYPES[visit.obs_type]
    return f"J{ra:08.4f}{dec:+08.4f}"


def _ccd_type(detector: Detector) -> str:
    parts = detector.serial.split("-")
    return parts[1] if len(parts) == 3 else detector.vendor


def _ascii(text: str) -> str:
    """Printable ASCII only, as FITS requires."""
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def _fit_card_value(key: str, text: str) -> str:
    # A HIERARCH card cannot continue: shorten the value so the card fits in 80 columns.
    room = _CARD_WIDTH - len(f"{key} = ''")
    if len(text.replace("'", "''")) <= room:
        return text
    while text and len((text + "...").replace("'", "''")) > room:
        text = text[:-1]
    return text + "..."


# ------------------------------------------------------------------------------- HDUs


def _amp_header(detector: Detector, amp: Amplifier) -> list[tuple[str, Any, str]]:
    cols = amp.raw_shape[1]
    p = amp.prescan
    x = (amp.x0 + amp.nx, amp.x0 + 1) if amp.flip_x else (amp.x0 + 1, amp.x0 + amp.nx)
    y = (amp.y0 + amp.ny, amp.y0 + 1) if amp.flip_y else (amp.y0 + 1, amp.y0 + amp.ny)
    # Detector coordinate = DTM * raw pixel + DTV (1-based), as obs_lsst raws declare it.
    dtv1 = amp.x0 + amp.nx + p + 1 if amp.flip_x else amp.x0 - p
    dtv2 = amp.y0 + amp.ny + 1 if amp.flip_y else amp.y0
    return [
        ("EXTNAME", f"Segment{amp.name[1:]}", "Amplifier segment"),
        ("CHANNEL", amp.index + 1, "Readout channel"),
        ("CCDSLOT", detector.sensor, "Sensor slot in the raft"),
        ("DATASEC", f"[{p + 1}:{p + amp.nx},1:{amp.ny}]", "Data section"),
        ("BIASSEC", f"[{p + amp.nx + 1}:{cols},1:{amp.ny}]", "Serial overscan section"),
        ("DETSEC", f"[{x[0]}:{x[1]},{y[0]}:{y[1]}]", "Section in the assembled image"),
        ("DETSIZE", f"[1:{detector.nx},1:{detector.ny}]", "Size of the assembled image"),
        ("DTV1", dtv1, "Detector transformation vector"),
        ("DTV2", dtv2, "Detector transformation vector"),
        ("DTM1_1", -1.0 if amp.flip_x else 1.0, "Detector transformation matrix"),
        ("DTM2_2", -1.0 if amp.flip_y else 1.0, "Detector transformation matrix"),
        ("DTM1_2", 0.0, "Detector transformation matrix"),
        ("DTM2_1", 0.0, "Detector transformation matrix"),
    ]


def _int32_pixels(detector: Detector, amp: Amplifier, pixels: Any) -> np.ndarray:
    arr = np.asarray(pixels)
    if arr.shape != amp.raw_shape:
        raise UserInputError(
            f"{detector.name} amplifier {amp.name}: pixels have shape {arr.shape}, the "
            f"readout is {amp.raw_shape} (truncated or corrupt readout?)"
        )
    if arr.dtype.kind not in "iu":
        raise UserInputError(
            f"{detector.name} amplifier {amp.name}: pixels must be integers, got {arr.dtype}"
        )
    if arr.dtype.itemsize > 4 or arr.dtype == np.uint32:
        info = np.iinfo(np.int32)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise UserInputError(
                f"{detector.name} amplifier {amp.name}: pixel values overflow int32"
            )
    if arr.dtype.kind == "i" and arr.dtype.itemsize == 4:
        # No copy for contiguous int32 (what the DAQ delivers), in either byte order.
        return np.ascontiguousarray(arr)
    return np.ascontiguousarray(arr, dtype=np.int32)


def build_hdulist(
    instrument: Instrument,
    detector: Detector,
    visit: VisitSpec,
    amps: Mapping[str, np.ndarray],
    *,
    problems: Sequence[HeaderProblem] = (),
    compress: bool = False,
    end_readout_tai_mjd: float | None = None,
) -> fits.HDUList:
    """One detector's raw file in memory: primary HDU, then one HDU per amplifier.

    The amplifier HDUs reference ``amps``' arrays (no copy for contiguous int32). While the
    file is written, astropy byte-swaps little-endian arrays to FITS order *in place* and
    back, so nobody else should read them meanwhile.

    Parameters
    ----------
    instrument, detector, visit, problems, end_readout_tai_mjd
        As for :func:`primary_header`.
    amps
        Amplifier name → raw int32 pixels in readout orientation (as
        ``DaqStore.read_detector`` returns them), one per amplifier of the detector.
    compress
        Tile-compress each amplifier with RICE_1 (lossless for integers), as ``.fits.fz``.

    Raises
    ------
    UserInputError
        An amplifier is missing, unknown, of the wrong shape or not integer.
    """
    expected = [a.name for a in detector.amplifiers]
    missing = [n for n in expected if n not in amps]
    extra = sorted(set(amps) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing amplifier(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unknown amplifier(s) {', '.join(extra)}")
        raise UserInputError(f"{visit.obs_id} {detector.name}: {'; '.join(parts)}")
    pixels = {a.name: _int32_pixels(detector, a, amps[a.name]) for a in detector.amplifiers}
    header = primary_header(
        instrument, detector, visit, problems=problems, end_readout_tai_mjd=end_readout_tai_mjd
    )
    hdus: list[Any] = [fits.PrimaryHDU(header=header)]
    for amp in detector.amplifiers:
        hdu: Any
        if compress:
            rows, cols = amp.raw_shape
            hdu = fits.CompImageHDU(
                data=pixels[amp.name],
                compression_type="RICE_1",
                tile_shape=(min(rows, RICE_TILE_ROWS), cols),
            )
        else:
            hdu = fits.ImageHDU(data=pixels[amp.name])
        for key, value, comment in _amp_header(detector, amp):
            # Set EXTNAME on the header, not as name=, to keep Rubin's 'Segment10' case.
            hdu.header[key] = (value, comment)
        hdus.append(hdu)
    return fits.HDUList(hdus)


# ------------------------------------------------------------------------------- files


def raw_filename(visit: VisitSpec, detector: str) -> str:
    """Rubin's raw file name, e.g. ``MC_O_20261121_000123_R22_S11.fits``."""
    return f"{visit.obs_id}_{detector}.fits"


def write_raw(path: Path, hdul: fits.HDUList, *, fsync: bool = True) -> int:
    """Write a raw file atomically, with CHECKSUM and DATASUM in every HDU.

    The file is written under a temporary name in the same directory (created if needed),
    flushed to disk and renamed over ``path``: a reader never sees a partial file under the
    final name, and a failure leaves nothing behind.

    Parameters
    ----------
    path
        Final name of the file.
    hdul
        The file's HDUs (from :func:`build_hdulist`).
    fsync
        Flush the file and its directory entry to stable storage before returning.

    Returns
    -------
    int
        Bytes written.

    Raises
    ------
    StorageFullError
        No space (or quota) left; nothing was left behind.
    StorageError
        Any other failure to write.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            hdul.writeto(f, checksum=True)
            f.flush()
            size = f.tell()
            if fsync:
                os.fsync(f.fileno())
        tmp.replace(path)
        if fsync:
            _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = exc.strerror or str(exc) or type(exc).__name__
        error: Callable[[str], StorageError] = (
            StorageFullError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else StorageError
        )
        raise error(f"cannot write {path}: {reason}") from exc
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return size


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
