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
``LdfExposure``
    python type :class:`ldf.pipelines.types.Exposure` (a processed detector image: image,
    variance, mask, WCS, PSF, zero point), written by :class:`ExposureFitsFormatter` as a
    multi-extension FITS file (layout in its docstring); derived component ``metadata`` (the
    exposure's header only, read without touching the pixels).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from lsst.daf.butler import DatasetProvenance, FormatterV2
from lsst.resources import ResourcePath

from ldf.pipelines.types import Exposure, Mask, PsfModel, VisitInfo

__all__ = [
    "EXPOSURE_STORAGE_CLASS",
    "HEADER_STORAGE_CLASS",
    "RAW_STORAGE_CLASS",
    "ExposureFitsFormatter",
    "RawFitsFormatter",
    "RawImage",
    "formatter_config",
    "read_exposure",
    "storage_class_config",
    "write_exposure",
]

RAW_STORAGE_CLASS = "LdfRawImage"
"""Storage class of ldf's raw datasets (python type :class:`RawImage`)."""

HEADER_STORAGE_CLASS = "LdfFitsHeader"
"""Storage class of a FITS header (``astropy.io.fits.Header``), the ``metadata`` component."""

EXPOSURE_STORAGE_CLASS = "LdfExposure"
"""Storage class of a processed exposure (python type :class:`ldf.pipelines.types.Exposure`)."""


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


# ------------------------------------------------------------------------------- exposures

EXPOSURE_FORMAT_VERSION = 1
"""Layout version written as ``LDF EXP VERSION`` (bump when the layout changes)."""

_EXP_PREFIX = "LDF EXP "
_VISIT_PREFIX = "LDF VISIT "
_WCS_PREFIX = "LDF WCS "
_LDF_PREFIXES = (_EXP_PREFIX, _VISIT_PREFIX, _WCS_PREFIX)
_PLANES = ("IMAGE", "VARIANCE", "MASK")
_STRUCTURAL = frozenset(
    {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "PCOUNT", "GCOUNT",
     "XTENSION", "EXTNAME", "CHECKSUM", "DATASUM", "BZERO", "BSCALE", "INHERIT"}
)  # fmt: skip
_WCS_KEY = re.compile(
    r"^(WCSAXES|WCSNAME|RADESYS|EQUINOX|LONPOLE|LATPOLE|MJDREF|DATEREF|CRPIX\d|CRVAL\d|"
    r"CDELT\d|CUNIT\d|CTYPE\d|CROTA\d|CD\d_\d|PC\d_\d|PV\d_\d+|PS\d_\d+|"
    r"[AB]P?_ORDER|[AB]P?_DMAX|[AB]P?_\d+_\d+)$"
)
"""Keywords of a celestial (TAN or TAN-SIP) WCS as ``astropy.wcs.WCS.to_header`` writes them."""


@cache
def _visit_field_types() -> dict[str, tuple[type, bool]]:
    """VisitInfo field → (type its header value is cast back to, whether it may be None)."""
    hints = typing.get_type_hints(VisitInfo)
    out: dict[str, tuple[type, bool]] = {}
    for f in dataclasses.fields(VisitInfo):
        hint = hints[f.name]
        optional = isinstance(hint, types.UnionType)
        if optional:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        out[f.name] = (hint, optional)
    return out


def _is_wcs_key(key: str) -> bool:
    return _WCS_KEY.match(key) is not None


def _clean_metadata(header: fits.Header) -> fits.Header:
    """The exposure's own metadata: ``header`` without structure, WCS and LDF EXP/VISIT/WCS
    cards."""
    out = header.copy()
    drop = {
        key
        for key in out
        if key in _STRUCTURAL or _is_wcs_key(key) or key.startswith(_LDF_PREFIXES)
    }
    for key in drop:
        out.remove(key, ignore_missing=True, remove_all=True)
    return out


def _wcs_cards(wcs: WCS) -> fits.Header:
    """The FITS cards of ``wcs``: standard ones, and its linear part exactly (``LDF WCS``).

    FITS fixed-format values hold at most 20 characters, so a double written as a standard
    card keeps ~15 significant digits; a WCS read back from those differs from the one
    written in the last bits, which the template warp and the kernel fit downstream turn
    into ~1e-5 relative differences of DiaSource fluxes. So CRPIX, CRVAL and the CD (or PC
    and CDELT) matrix are also written as ``HIERARCH LDF WCS <key>`` strings holding the
    shortest exact repr of each double (afw, likewise, keeps its exact SkyWcs in a binary
    extension next to the approximate FITS cards). A CD-matrix WCS is written as CD cards,
    so it reads back as the same wcslib representation.
    """
    header = wcs.to_header(relax=True)
    for key in list(header):
        if not _is_wcs_key(key):  # e.g. DATE-OBS/MJD-OBS of a WCS with a time axis
            del header[key]
    w = wcs.wcs
    n = w.naxis
    exact: dict[str, float] = {}
    for i in range(n):
        exact[f"CRPIX{i + 1}"] = float(w.crpix[i])
        exact[f"CRVAL{i + 1}"] = float(w.crval[i])
    if w.has_cd():
        for i in range(n):
            header.remove(f"CDELT{i + 1}", ignore_missing=True)
            for j in range(n):
                header.remove(f"PC{i + 1}_{j + 1}", ignore_missing=True)
                exact[f"CD{i + 1}_{j + 1}"] = float(w.cd[i, j])
    else:
        pc, cdelt = w.get_pc(), w.get_cdelt()
        for i in range(n):
            exact[f"CDELT{i + 1}"] = float(cdelt[i])
            for j in range(n):
                exact[f"PC{i + 1}_{j + 1}"] = float(pc[i, j])
    for key, value in exact.items():
        header[key] = value
    for key, value in exact.items():
        header[f"HIERARCH {_WCS_PREFIX}{key}"] = repr(value)
    return header


def _read_wcs(header: fits.Header) -> WCS | None:
    """The WCS of :func:`_wcs_cards`, with the exact values of its linear part."""
    cards = fits.Header([card for card in header.cards if _is_wcs_key(card.keyword)])
    if "CTYPE1" not in cards:
        return None
    with warnings.catch_warnings():
        # MJDREF = 0 and friends are normal for a WCS without a time axis.
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(cards, relax=True)
    exact = {
        key[len(_WCS_PREFIX) :]: float(str(value))
        for key, value in header.items()
        if key.startswith(_WCS_PREFIX)
    }
    if exact:
        w = wcs.wcs
        n = w.naxis
        w.crpix = [exact.get(f"CRPIX{i + 1}", w.crpix[i]) for i in range(n)]
        w.crval = [exact.get(f"CRVAL{i + 1}", w.crval[i]) for i in range(n)]
        if "CD1_1" in exact:
            w.cd = [[exact.get(f"CD{i + 1}_{j + 1}", 0.0) for j in range(n)] for i in range(n)]
        elif "PC1_1" in exact:
            w.pc = [[exact[f"PC{i + 1}_{j + 1}"] for j in range(n)] for i in range(n)]
            w.cdelt = [exact[f"CDELT{i + 1}"] for i in range(n)]
        w.set()
    return wcs


def _exposure_hdulist(exposure: Exposure) -> fits.HDUList:
    """The FITS layout of :class:`ExposureFitsFormatter` (see its docstring)."""
    primary = fits.PrimaryHDU(header=_clean_metadata(exposure.metadata))
    h = primary.header
    h[f"HIERARCH {_EXP_PREFIX}VERSION"] = (EXPOSURE_FORMAT_VERSION, "ldf exposure file layout")
    h[f"HIERARCH {_EXP_PREFIX}PIXSCALE"] = (float(exposure.pixel_scale_arcsec), "[arcsec/px]")
    if exposure.zero_point is not None:
        h[f"HIERARCH {_EXP_PREFIX}ZEROPT"] = (
            float(exposure.zero_point),
            "[mag] AB magnitude of 1 electron/s",
        )
    if exposure.background_level is not None:
        h[f"HIERARCH {_EXP_PREFIX}BGLEVEL"] = (
            float(exposure.background_level),
            "[electron] median sky subtracted",
        )
    for name in _visit_field_types():
        value = getattr(exposure.info, name)
        if value is not None:
            h[f"HIERARCH {_VISIT_PREFIX}{name.upper()}"] = value
    wcs = _wcs_cards(exposure.wcs) if exposure.wcs is not None else fits.Header()
    h.update(wcs)

    image = fits.ImageHDU(np.asarray(exposure.image, np.float32), name="IMAGE")
    image.header.update(wcs)  # so image viewers show sky coordinates
    variance = fits.ImageHDU(np.asarray(exposure.variance, np.float32), name="VARIANCE")
    mask = fits.ImageHDU(np.asarray(exposure.mask, np.uint16), name="MASK")
    for plane in Mask:  # afw's convention: MP_<plane name> = bit number
        assert plane.name is not None
        mask.header[f"HIERARCH MP_{plane.name}"] = int(plane).bit_length() - 1
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [primary, image, variance, mask]
    if exposure.psf is not None:
        psf = fits.ImageHDU(np.asarray(exposure.psf.image), name="PSF")
        psf.header["PSFFWHM"] = (float(exposure.psf.fwhm_px), "[px] PSF FWHM")
        psf.header["PSFE1"] = (float(exposure.psf.e1), "PSF ellipticity e1")
        psf.header["PSFE2"] = (float(exposure.psf.e2), "PSF ellipticity e2")
        hdus.append(psf)
    return fits.HDUList(hdus)


def write_exposure(exposure: Exposure, path: str | Path) -> None:
    """Write ``exposure`` to ``path`` in the layout of :class:`ExposureFitsFormatter`."""
    with contextlib.closing(_exposure_hdulist(exposure)) as hdul:
        hdul.writeto(path, overwrite=True)


def _native(data: Any, dtype: type) -> np.ndarray:
    """A native-endian in-memory copy of FITS pixels (FITS is big-endian)."""
    return np.array(data, dtype=np.dtype(dtype).newbyteorder("="))


def _visit_info(header: fits.Header, path: str | Path) -> VisitInfo:
    values: dict[str, Any] = {}
    missing = []
    for name, (kind, optional) in _visit_field_types().items():
        value = header.get(f"{_VISIT_PREFIX}{name.upper()}")
        if value is None or isinstance(value, fits.card.Undefined):
            values[name] = None
            if not optional:
                missing.append(f"{_VISIT_PREFIX}{name.upper()}")
        else:
            values[name] = kind(value)
    if missing:
        raise ValueError(f"{path}: incomplete visit keywords: no {', '.join(missing)}")
    return VisitInfo(**values)


def read_exposure_metadata(path: str | Path) -> fits.Header:
    """The ``metadata`` of an exposure file (primary header, cleaned), without the pixels."""
    return _clean_metadata(read_primary_header(path))


def read_exposure(path: str | Path) -> Exposure:
    """Read a file written by :func:`write_exposure` (or the formatter) fully into memory.

    Raises
    ------
    ValueError
        The file is not an ldf exposure (no ``LDF EXP VERSION``, a missing plane, a newer
        layout) or its visit keywords are incomplete.
    OSError
        The file cannot be read.
    """
    with fits.open(path, memmap=False, lazy_load_hdus=True) as hdul:
        h = hdul[0].header
        version = h.get(f"{_EXP_PREFIX}VERSION")
        if version is None:
            raise ValueError(f"{path} is not an ldf exposure file (no LDF EXP VERSION)")
        if int(version) > EXPOSURE_FORMAT_VERSION:
            raise ValueError(
                f"{path} has exposure layout version {version}; this ldf reads up to "
                f"{EXPOSURE_FORMAT_VERSION}"
            )
        names = {hdu.name for hdu in hdul}
        if missing := [p for p in _PLANES if p not in names]:
            raise ValueError(f"{path}: no {', '.join(missing)} HDU")
        psf = None
        if "PSF" in names:
            ph = hdul["PSF"].header
            data = hdul["PSF"].data
            psf = PsfModel(
                image=_native(data, data.dtype.type),
                fwhm_px=float(ph["PSFFWHM"]),
                e1=float(ph.get("PSFE1", 0.0)),
                e2=float(ph.get("PSFE2", 0.0)),
            )
        zp = h.get(f"{_EXP_PREFIX}ZEROPT")
        bg = h.get(f"{_EXP_PREFIX}BGLEVEL")
        image = _native(hdul["IMAGE"].data, np.float32)
        wcs = _read_wcs(h)
        if wcs is not None:
            wcs.pixel_shape = (image.shape[1], image.shape[0])
        return Exposure(
            image=image,
            variance=_native(hdul["VARIANCE"].data, np.float32),
            mask=_native(hdul["MASK"].data, np.uint16),
            info=_visit_info(h, path),
            metadata=_clean_metadata(h),
            wcs=wcs,
            pixel_scale_arcsec=float(h.get(f"{_EXP_PREFIX}PIXSCALE", 0.2)),
            psf=psf,
            zero_point=None if zp is None else float(zp),
            background_level=None if bg is None else float(bg),
        )


class ExposureFitsFormatter(FormatterV2):
    """Read and write :class:`ldf.pipelines.types.Exposure` as a multi-extension FITS file.

    Layout (uncompressed, so a read returns exactly what was written)::

        HDU 0  PRIMARY   no data. The exposure's metadata (raw primary header plus the
                         processing keywords stages add), then
                         LDF EXP VERSION / PIXSCALE / ZEROPT (AB mag of 1 e-/s) /
                         BGLEVEL (e-), LDF VISIT <FIELD> (every VisitInfo field that is
                         set), the WCS (TAN or TAN-SIP cards, and LDF WCS <key>
                         exact values), and the Butler provenance
                         (LSST BUTLER ID / RUN / DATASETTYPE / INPUT n …) added on put.
        HDU 1  IMAGE     float32 (ny, nx), with the WCS cards too (for image viewers)
        HDU 2  VARIANCE  float32 (ny, nx)
        HDU 3  MASK      uint16 (ny, nx) (stored as int16 + BZERO); MP_<plane> = bit
        HDU 4  PSF       the PSF image (optional), PSFFWHM (px), PSFE1, PSFE2

    The WCS's CRPIX, CRVAL and CD (or PC, CDELT) are also written exactly, as ``LDF WCS
    <key>`` strings: a read gives back the very WCS written (see :func:`_wcs_cards`). The
    ``metadata`` component reads HDU 0 only. Reading strips the structural, WCS and ``LDF
    EXP``/``LDF VISIT``/``LDF WCS`` cards from ``metadata`` (they live in the other fields),
    as afw strips the WCS from an Exposure's metadata.
    """

    default_extension = ".fits"
    supported_extensions = frozenset({".fits", ".fit"})
    can_read_from_local_file = True

    def read_from_local_file(
        self, path: str, component: str | None = None, expected_size: int = -1
    ) -> Any:
        """Read the file at ``path``: the whole Exposure, or its ``metadata`` component."""
        if component == "metadata":
            return read_exposure_metadata(path)
        if component is not None:
            raise ValueError(f"ldf exposure files have no component {component!r}")
        return read_exposure(path)

    def add_provenance(
        self, in_memory_dataset: Any, /, *, provenance: DatasetProvenance | None = None
    ) -> Any:
        """Record the Butler provenance (dataset id, run, inputs) in the metadata written.

        The caller's Exposure is not modified: a shallow copy with a new header is returned.
        Provenance cards an input exposure carried (its own ``LSST BUTLER …``) are replaced.
        """
        if not isinstance(in_memory_dataset, Exposure):
            return in_memory_dataset
        header = in_memory_dataset.metadata.copy()
        DatasetProvenance.strip_provenance_from_flat_dict(header)
        prov = provenance or DatasetProvenance()
        flat = prov.to_flat_dict(
            self.dataset_ref, prefix="LSST BUTLER", sep=" ", simple_types=True, max_inputs=20
        )
        for key, value in flat.items():
            header[f"HIERARCH {key}"] = value
        return dataclasses.replace(in_memory_dataset, metadata=header)

    def write_local_file(self, in_memory_dataset: Any, uri: ResourcePath) -> None:
        """Write an :class:`~ldf.pipelines.types.Exposure` to the local file behind ``uri``."""
        if not isinstance(in_memory_dataset, Exposure):
            raise TypeError(
                f"cannot write {type(in_memory_dataset).__name__} as an ldf exposure file"
            )
        write_exposure(in_memory_dataset, uri.ospath)


def storage_class_config() -> dict[str, Any]:
    """The ``storageClasses`` section a repository needs for ldf's raws and exposures."""
    return {
        HEADER_STORAGE_CLASS: {"pytype": "astropy.io.fits.Header"},
        RAW_STORAGE_CLASS: {
            "pytype": f"{RawImage.__module__}.RawImage",
            "parameters": ["amplifiers"],
            "derivedComponents": {"metadata": HEADER_STORAGE_CLASS},
        },
        EXPOSURE_STORAGE_CLASS: {
            "pytype": f"{Exposure.__module__}.Exposure",
            "derivedComponents": {"metadata": HEADER_STORAGE_CLASS},
        },
    }


def formatter_config() -> dict[str, str]:
    """The ``datastore.formatters`` entries mapping ldf's storage classes to formatters."""
    name = f"{RawFitsFormatter.__module__}.RawFitsFormatter"
    return {
        RAW_STORAGE_CLASS: name,
        HEADER_STORAGE_CLASS: name,
        EXPOSURE_STORAGE_CLASS: f"{ExposureFitsFormatter.__module__}.ExposureFitsFormatter",
    }
