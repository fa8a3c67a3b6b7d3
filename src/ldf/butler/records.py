"""What ldf needs to know to register one raw file in a Butler repository.

A :class:`RawRecord` carries the exposure metadata Rubin's ``exposure`` dimension record holds
(obs_base builds the same record from ``ObservationInfo``) plus the file and its detector.
Build one from the scheduler's :class:`~ldf.sim.models.VisitSpec` (:meth:`RawRecord.from_visit`)
or from the file's primary header (:meth:`RawRecord.from_file`), which reads the standard
keywords Rubin's cameras write:

==========  ===========================================================================
keyword     meaning
==========  ===========================================================================
INSTRUME    instrument ('LSSTCam', 'LATISS')
OBSID       observation id ('MC_O_20261121_000123')
DAYOBS      observing day YYYYMMDD; SEQNUM its sequence number
IMGTYPE     observation type ('science'/'OBJECT', 'bias', 'dark', 'flat', 'engtest')
EXPTIME     shutter-open seconds; DARKTIME seconds from clear to readout
FILTER      physical filter (LATISS: GRATING is appended as 'FILTER~GRATING'); FILTBAND band
MJD-BEG     start of integration, TAI MJD (else DATE-BEG, ISO TAI); MJD-END/DATE-END end
RA, DEC     boresight ICRS degrees (else RASTART/DECSTART); ROTPA sky rotation
AZSTART     azimuth; ELSTART altitude; AMSTART airmass (degrees / dimensionless)
RAFTBAY     raft ('R22'); CCDSLOT sensor ('S11'); together the detector name (else DETNAME)
GROUPID     group of exposures; PROGRAM science program; REASON observation reason
OBJECT      target name
==========  ===========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astropy.io import fits
from astropy.time import Time

from ldf.butler.formatters import read_primary_header
from ldf.errors import UserInputError
from ldf.sim.models import VisitSpec
from ldf.sim.models import exposure_id as make_exposure_id

__all__ = ["RawRecord"]

_IMGTYPE_ALIASES = {"object": "science", "acq": "acq", "zero": "bias"}


@dataclass(frozen=True)
class RawRecord:
    """One raw file (one detector of one exposure) and the metadata its registration needs."""

    path: str
    """Local path or URI of the file."""
    instrument: str
    """Rubin's instrument name ('LSSTCam', 'LATISS')."""
    day_obs: int
    """Observing day YYYYMMDD."""
    seq_num: int
    """Sequence number within the day."""
    exposure_id: int
    """Rubin's exposure id, ``day_obs * 100000 + seq_num``."""
    obs_id: str
    """Rubin's observation id ('MC_O_20261121_000123')."""
    detector: str
    """Detector name ('R22_S11')."""
    physical_filter: str
    """Filter in the beam ('r_57'; LATISS 'SDSSr_65mm~empty'); unknown ones are registered."""
    band: str | None
    """Band of the physical filter (None for a closed-dome exposure without one)."""
    obs_type: str
    """Observation type: 'science', 'bias', 'dark', 'flat', 'engtest', …"""
    exp_time_s: float
    """Shutter-open time (seconds)."""
    dark_time_s: float
    """Time from CCD clear to readout (seconds)."""
    start_tai_mjd: float
    """Start of integration (TAI MJD)."""
    end_tai_mjd: float
    """End of integration (TAI MJD)."""
    group: str
    """Group of exposures taken together (pair, sequence, calibration block)."""
    science_program: str = ""
    """Observing program ('BLOCK-365')."""
    observation_reason: str = ""
    """Why it was taken ('wfd', 'ddf', 'calibration')."""
    target_name: str = ""
    """Object of interest or survey field name."""
    ra_deg: float | None = None
    """Tracking ICRS right ascension of the boresight (None off-sky)."""
    dec_deg: float | None = None
    """Tracking ICRS declination of the boresight (None off-sky)."""
    rot_sky_deg: float | None = None
    """Sky angle of the focal plane."""
    az_deg: float | None = None
    """Azimuth at the start of the exposure."""
    alt_deg: float | None = None
    """Altitude at the start of the exposure."""
    airmass: float | None = None
    """Airmass at the start (used for the zenith angle when the altitude is missing)."""
    can_see_sky: bool | None = None
    """Whether the detector could see the sky (None: unknown)."""
    has_simulated: bool = False
    """Whether any of the content was simulated."""

    @property
    def zenith_angle_deg(self) -> float | None:
        """Zenith angle from the altitude, else from the airmass (plane-parallel)."""
        if self.alt_deg is not None:
            return 90.0 - self.alt_deg
        if self.airmass is not None and self.airmass >= 1.0:
            return math.degrees(math.acos(1.0 / self.airmass))
        return None

    @classmethod
    def from_visit(
        cls, visit: VisitSpec, detector: str, path: str | Path, *, has_simulated: bool = True
    ) -> RawRecord:
        """The record of one detector's file of a visit the simulated camera took.

        Parameters
        ----------
        visit
            The exposure as the scheduler planned it.
        detector
            Detector name ('R22_S11').
        path
            Where the file is.
        has_simulated
            Mark the exposure as (partly) simulated, as ldf's camera is.
        """
        on_sky = visit.obs_type.value in ("science", "acq", "engtest")
        return cls(
            path=str(path),
            instrument=visit.instrument,
            day_obs=visit.day_obs,
            seq_num=visit.seq_num,
            exposure_id=visit.exposure_id,
            obs_id=visit.obs_id,
            detector=detector,
            physical_filter=visit.physical_filter or "unknown",
            band=visit.band,
            obs_type=visit.obs_type.value,
            exp_time_s=visit.exp_time_s,
            dark_time_s=visit.dark_time_s,
            start_tai_mjd=visit.start_tai_mjd,
            end_tai_mjd=visit.end_tai_mjd,
            group=visit.group_id,
            science_program=visit.program,
            observation_reason=visit.reason,
            ra_deg=visit.ra_deg if on_sky else None,
            dec_deg=visit.dec_deg if on_sky else None,
            rot_sky_deg=visit.rot_sky_deg if on_sky else None,
            az_deg=visit.az_deg,
            alt_deg=visit.alt_deg,
            airmass=visit.airmass,
            can_see_sky=on_sky and visit.exp_time_s > 0,
            has_simulated=has_simulated,
        )

    @classmethod
    def from_header(cls, header: fits.Header | dict[str, Any], path: str | Path) -> RawRecord:
        """The record described by a raw file's primary header (keywords in the module doc).

        Raises
        ------
        UserInputError
            A required keyword is missing or malformed.
        """
        h = header
        required = ("INSTRUME", "DAYOBS", "SEQNUM", "OBSID", "EXPTIME")
        if missing := [k for k in required if k not in h]:
            raise UserInputError(f"{path}: raw header has no {', '.join(missing)} keyword(s)")
        try:
            instrument = str(h["INSTRUME"])
            day_obs = int(h["DAYOBS"])
            seq_num = int(h["SEQNUM"])
            obs_id = str(h["OBSID"])
            if "RAFTBAY" in h and "CCDSLOT" in h:
                detector = f"{h['RAFTBAY']}_{h['CCDSLOT']}"
            else:
                detector = str(h["DETNAME"])
            start = _tai_mjd(h, "MJD-BEG", "DATE-BEG")
            end = _tai_mjd(h, "MJD-END", "DATE-END")
            exp_time = float(h["EXPTIME"])
        except KeyError:
            raise UserInputError(
                f"{path}: raw header needs MJD-BEG/DATE-BEG, MJD-END/DATE-END and "
                "RAFTBAY+CCDSLOT or DETNAME"
            ) from None
        except (TypeError, ValueError) as exc:
            raise UserInputError(f"{path}: malformed raw header: {exc}") from None
        physical_filter = str(h.get("FILTER") or "unknown")
        grating = h.get("GRATING")
        if grating and "~" not in physical_filter:
            physical_filter = f"{physical_filter}~{grating}"
        img = str(h.get("IMGTYPE", "science")).strip().lower()
        band = h.get("FILTBAND")
        return cls(
            path=str(path),
            instrument=instrument,
            day_obs=day_obs,
            seq_num=seq_num,
            exposure_id=int(h.get("EXPID", 0)) or make_exposure_id(day_obs, seq_num),
            obs_id=obs_id,
            detector=detector,
            physical_filter=physical_filter,
            band=str(band) if band else None,
            obs_type=_IMGTYPE_ALIASES.get(img, img),
            exp_time_s=exp_time,
            dark_time_s=float(h.get("DARKTIME", exp_time)),
            start_tai_mjd=start,
            end_tai_mjd=end,
            group=str(h.get("GROUPID") or obs_id),
            science_program=str(h.get("PROGRAM", "")),
            observation_reason=str(h.get("REASON", "")),
            target_name=str(h.get("OBJECT", "")),
            ra_deg=_opt_float(h, "RA", "RASTART"),
            dec_deg=_opt_float(h, "DEC", "DECSTART"),
            rot_sky_deg=_opt_float(h, "ROTPA"),
            az_deg=_opt_float(h, "AZSTART"),
            alt_deg=_opt_float(h, "ELSTART"),
            airmass=_opt_float(h, "AMSTART"),
            has_simulated=bool(h.get("SIMULATE", False)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> RawRecord:
        """Read a raw file's primary header and build its record.

        Raises
        ------
        UserInputError
            The file is not a FITS file or its header lacks a required keyword.
        """
        try:
            header = read_primary_header(path)
        except OSError as exc:
            raise UserInputError(f"{path}: cannot read a FITS header: {exc}") from None
        return cls.from_header(header, path)


def _tai_mjd(h: Any, mjd_key: str, iso_key: str) -> float:
    if mjd_key in h:
        return float(h[mjd_key])
    return float(Time(str(h[iso_key]), format="isot", scale="tai").mjd)


def _opt_float(h: Any, *keys: str) -> float | None:
    for key in keys:
        value = h.get(key)
        if value is not None and value != "":
            return float(value)
    return None
