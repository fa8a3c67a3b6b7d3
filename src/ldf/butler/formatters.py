"""Raw multi-extension FITS files as Butler datasets, without obs_base or afw.

Rubin's raws are stored by obs_base as ``Exposure`` (an afw type). ldf has no afw, so a raw is
read into :class:`RawImage`, a small dataclass of plain astropy/numpy objects:

* the primary header (``astropy.io.fits.Header``), whose standard keywords (INSTRUME, OBSID,
  DAYOBS, SEQNUM, EXPTIME, FILTER, IMGTYPE, DATE-BEG, …) describe the exposure;
* one ``numpy`` array per amplifier, keyed by Rubin's amplifier name (C10..C17, C07..C00),
  in HDU (readout) order, untrimmed (prescan and overscans included);
* each amplifier HDU's own header (DATASEC, BIASSEC, … when the writer gives them).

Why a dataclass and not ``astropy.io.fits.HDUList``: an ``HDUList`` may keep the file open
(memory mapping) after ``butler.get`` returns, which breaks once the datastore removes or
replaces the file, and it is awkward to pickle across worker processes. :class:`RawImage` is
fully in memory and pickles.

Storage classes (declared in the repository seed config by :func:`storage_class_config`):

``LdfRawImage``
    python type :class:`RawImage`; read parameter ``amplifiers`` (names to read, the others
    are skipped); derived component ``metadata`` (the primary header only, read without
    touching the pixels).
``LdfFitsHeader``
    python type ``astropy.io.fits.Header``; the storage class of the ``metadata`` component.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from lsst.daf.butler import FormatterV2
from lsst.resources import ResourcePath

__all__ = [
    "HEADER_STORAGE_CLASS",
    "RAW_STORAGE_CLASS",
    "RawFitsFormatter",
    "RawImage",
    "formatter_config",
    "storage_class_config",
]

RAW_STORAGE_CLASS = "LdfRawImage"
"""Storage class of ldf's raw datasets (python type :class:`RawImage`)."""

HEADER_STORAGE_CLASS = "LdfFitsHeader"
"""Storage class of a FITS header (``astropy.io.fits.Header``), the ``metadata`` component."""


@dataclass
class RawImage:
    """One detector's raw exposure: primary header and untrimmed amplifier images."""

    metadata: fits.Header
    """Primary header of the file (exposure-level keywords)."""
    amplifiers: dict[str, np.ndarray] = field(default_factory=dict)
    """Amplifier name → raw image (rows, cols), overscans included, in HDU order."""
    amp_headers: dict[str, fits.Header] = field(default_factory=dict)
    """Amplifier name → header of its image HDU."""

    def to_hdulist(self) -> fits.HDUList:
        """The file as LSSTCam writes it: primary HDU, then one image HDU per amplifier."""
        hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [fits.PrimaryHDU(header=self.metadata)]
        for name, pixels in self.amplifiers.items():
            header = self.amp_headers.get(name, fits.Header()).copy()
            hdu = fits.ImageHDU(data=pixels, header=header)
            hdu.header["EXTNAME"] = f"Segment{name[1:]}"
            hdu.header["AMPNAME"] = name
            hdus.append(hdu)
        return fits.HDUList(hdus)

    def writeto(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Write the multi-extension FITS file to ``path``."""
        self.to_hdulist().writeto(path, overwrite=overwrite)

    @classmethod
    def read(cls, path: str | Path, amplifiers: Iterable[str] | None = None) -> RawImage:
        """Read a raw MEF FITS file fully into memory.

        Parameters
        ----------
        path
            Local file.
        amplifiers
            Only these amplifiers (by name); ``None`` reads all of them.

        Raises
        ------
        KeyError
            An amplifier named in ``amplifiers`` is not in the file.
        """
        wanted = None if amplifiers is None else set(amplifiers)
        out = cls(metadata=fits.Header())
        with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
            out.metadata = hdul[0].header.copy()
            for hdu in hdul[1:]:
                name = amp_name(hdu.header)
                if wanted is not None and name not in wanted:
                    continue
                data = hdu.data
                # FITS is big-endian; hand numpy-native integers to the caller.
                out.amplifiers[name] = np.array(data, dtype=data.dtype.newbyteorder("="))
                out.amp_headers[name] = hdu.header.copy()
        if wanted is not None and (missing := wanted - set(out.amplifiers)):
            raise KeyError(f"{path}: no amplifier(s) {sorted(missing)}")
        return out


def amp_name(header: fits.Header) -> str:
    """Rubin's amplifier name of an image HDU: AMPNAME, else from EXTNAME 'SegmentXY' → 'CXY'."""
    if "AMPNAME" in header:
        return str(header["AMPNAME"])
    extname = str(header.get("EXTNAME", ""))
    # Case-insensitive: astropy upper-cases EXTNAME when it is given as an HDU's name.
    if extname.lower().startswith("segment"):
        return "C" + extname[len("segment") :]
    return extname


def read_primary_header(path: str | Path) -> fits.Header:
    """The primary header of a FITS file, without reading any pixels."""
    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        return hdul[0].header.copy()


class RawFitsFormatter(FormatterV2):
    """Read and write :class:`RawImage` as a multi-extension FITS file.

    Reading supports the ``metadata`` component (primary header only) and the ``amplifiers``
    read parameter (an iterable of amplifier names).
    """

    default_extension = ".fits"
    supported_extensions = frozenset({".fits", ".fit", ".fits.fz"})
    can_read_from_local_file = True

    def read_from_local_file(
        self, path: str, component: str | None = None, expected_size: int = -1
    ) -> Any:
        """Read the file at ``path``; see the class docstring for components and parameters."""
        if component == "metadata":
            return read_primary_header(path)
        if component is not None:
            raise ValueError(f"raw FITS files have no component {component!r}")
        params = self.file_descriptor.parameters or {}
        amps = params.get("amplifiers")
        if isinstance(amps, str):
            amps = [amps]
        return RawImage.read(path, amplifiers=amps)

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        """Write a :class:`RawImage` (or an ``HDUList``) to the local file behind ``uri``."""
        if isinstance(in_memory_dataset, RawImage):
            hdul = in_memory_dataset.to_hdulist()
        elif isinstance(in_memory_dataset, fits.HDUList):
            hdul = in_memory_dataset
        else:
            raise TypeError(f"cannot write {type(in_memory_dataset).__name__} as a raw FITS file")
        with contextlib.closing(hdul):
            hdul.writeto(uri.ospath, overwrite=True)


def storage_class_config() -> dict[str, Any]:
    """The ``storageClasses`` section a repository needs for ldf's raws."""
    return {
        HEADER_STORAGE_CLASS: {"pytype": "astropy.io.fits.Header"},
        RAW_STORAGE_CLASS: {
            "pytype": f"{RawImage.__module__}.RawImage",
            "parameters": ["amplifiers"],
            "derivedComponents": {"metadata": HEADER_STORAGE_CLASS},
        },
    }


def formatter_config() -> dict[str, str]:
    """The ``datastore.formatters`` entries mapping ldf's storage classes to formatters."""
    name = f"{RawFitsFormatter.__module__}.RawFitsFormatter"
    return {RAW_STORAGE_CLASS: name, HEADER_STORAGE_CLASS: name}
