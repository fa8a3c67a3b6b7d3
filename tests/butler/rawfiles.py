"""Tiny raw files as LSSTCam and LATISS write them, for the Butler tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from astropy.io import fits

from ldf.sim.models import exposure_id, obs_id

DAY_OBS = 20261121
"""Observing day of the test raws."""

WriteRaw = Callable[..., Path]
"""The ``write_raw`` fixture: ``(seq_num, detector, *, instrument, day_obs, **header)`` → path."""


def amp_pixels(seq_num: int, detector: str, amp_index: int) -> np.ndarray:
    """The pixels the test writes to one amplifier: distinct per file and amplifier."""
    base = seq_num * 1_000_000 + sum(map(ord, detector)) * 100 + amp_index * 7
    return (np.arange(6 * 8, dtype=np.int32).reshape(6, 8) + base).astype(np.int32)


def raw_header(
    instrument: str, day_obs: int, seq_num: int, detector: str, **extra: object
) -> fits.Header:
    """A primary header with the keywords Rubin's cameras write."""
    raft, sensor = detector.split("_")
    start = 61365.1 + seq_num * 0.0005
    header = fits.Header()
    header.update(
        {
            "INSTRUME": instrument,
            "OBSID": obs_id(instrument, day_obs, seq_num),
            "DAYOBS": str(day_obs),
            "SEQNUM": seq_num,
            "IMGTYPE": "science",
            "EXPTIME": 30.0,
            "DARKTIME": 30.9,
            "FILTER": "r_57" if instrument == "LSSTCam" else "SDSSr_65mm",
            "FILTBAND": "r",
            "MJD-BEG": start,
            "MJD-END": start + 30.9 / 86400,
            "RA": 150.1,
            "DEC": -30.2,
            "ROTPA": 12.0,
            "AZSTART": 180.0,
            "ELSTART": 70.0,
            "AMSTART": 1.064,
            "RAFTBAY": raft,
            "CCDSLOT": sensor,
            "GROUPID": f"{day_obs}-pair-{(seq_num + 1) // 2}",
            "PROGRAM": "BLOCK-365",
            "REASON": "wfd",
            "OBJECT": "field_42",
            "SIMULATE": True,
        }
    )
    if instrument == "LATISS":
        header["GRATING"] = "empty"
    header.update(extra)
    return header


def exp_id(seq_num: int, day_obs: int = DAY_OBS) -> int:
    """Exposure id of the test raws."""
    return exposure_id(day_obs, seq_num)
