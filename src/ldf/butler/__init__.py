"""Butler repositories for ldf's raw files: instruments, raw FITS formatter, ingest and queries.

``lsst-daf-butler`` repositories are the Butler interface of the OODS and of the archive
(LDM-230 2.6.2.3.1, 5.1). This package makes them work without obs_base or afw:

* :mod:`ldf.butler.instrument` — LSSTCam and LATISS as ``lsst.pipe.base.Instrument``
  subclasses (detectors, physical filters);
* :mod:`ldf.butler.formatters` — :class:`RawImage` and the ``FormatterV2`` that reads and
  writes raw multi-extension FITS files (storage class ``LdfRawImage``);
* :mod:`ldf.butler.records` — :class:`RawRecord`, what registering one raw file needs;
* :mod:`ldf.butler.repo` — :class:`ButlerRepo`: create/open, ingest, query, get, remove.
"""

from __future__ import annotations

from ldf.butler.formatters import RAW_STORAGE_CLASS, RawFitsFormatter, RawImage
from ldf.butler.instrument import LatissInstrument, LdfInstrument, LsstCamInstrument
from ldf.butler.records import RawRecord
from ldf.butler.repo import RAW_DATASET_TYPE, ButlerRepo, default_raw_run

__all__ = [
    "RAW_DATASET_TYPE",
    "RAW_STORAGE_CLASS",
    "ButlerRepo",
    "LatissInstrument",
    "LdfInstrument",
    "LsstCamInstrument",
    "RawFitsFormatter",
    "RawImage",
    "RawRecord",
    "default_raw_run",
]
