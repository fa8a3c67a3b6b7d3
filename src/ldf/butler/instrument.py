"""LSSTCam and LATISS as ``lsst.pipe.base.Instrument`` subclasses, without obs_base.

Rubin's own instrument classes live in obs_lsst and need afw. These pure-Python ones register
the same dimension records a Rubin repository has, from ldf's camera description
(:func:`ldf.sim.instruments.get_instrument`):

* ``instrument``: name as Rubin spells it, exposure/visit id limits, this class's name (so
  ``Instrument.fromName`` and ``pipetask`` can rebuild it);
* ``detector``: Rubin's id, ``full_name`` ('R22_S11'), ``raft`` ('R22'), ``name_in_raft``
  ('S11') and ``purpose`` ('SCIENCE', 'WAVEFRONT' or 'GUIDER');
* ``physical_filter`` (and so ``band``): one per band for LSSTCam ('r_57' → 'r'); for LATISS
  every ``<filter>~<disperser>`` combination as obs_lsst names them ('SDSSr_65mm~empty' → 'r').

Either class also registers with the official CLI:
``butler register-instrument REPO ldf.butler.instrument.LsstCamInstrument``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lsst.daf.butler import DataId, FormatterV2
from lsst.pipe.base import Instrument
from lsst.utils import doImportType
from lsst.utils.introspection import get_full_type_name

from ldf.butler.formatters import RAW_STORAGE_CLASS, RawFitsFormatter
from ldf.errors import UserInputError
from ldf.sim.instruments import Instrument as SimInstrument
from ldf.sim.instruments import get_instrument

__all__ = [
    "INSTRUMENT_CLASSES",
    "RAW_DIMENSIONS",
    "LatissInstrument",
    "LdfInstrument",
    "LsstCamInstrument",
    "instrument_class",
]

RAW_DIMENSIONS = ("instrument", "exposure", "detector")
"""Dimensions of the ``raw`` dataset type, as in Rubin's repositories."""

EXPOSURE_MAX = 10**13
"""Exclusive bound of exposure/visit ids: ``day_obs * 100000 + seq_num`` for any YYYYMMDD."""


class LdfInstrument(Instrument):
    """An ldf camera registered in a Butler repository (abstract: see the two subclasses)."""

    name: ClassVar[str]
    """Rubin's instrument name ('LSSTCam', 'LATISS')."""
    detector_max: ClassVar[int]
    """Exclusive bound of detector ids (as obs_lsst sets it)."""

    raw_definition = ("raw", RAW_DIMENSIONS, RAW_STORAGE_CLASS)

    @classmethod
    def getName(cls) -> str:  # noqa: N802 - pipe_base's abstract method name
        """Rubin's instrument name, the value of ``instrument`` in data IDs."""
        return cls.name

    @classmethod
    def camera(cls) -> SimInstrument:
        """ldf's description of this camera (detectors, filters)."""
        return get_instrument(cls.name)

    @classmethod
    def physical_filters(cls) -> dict[str, str]:
        """Physical filter name → band, as registered."""
        return {pf: band for band, pf in cls.camera().filters.items()}

    def register(self, registry: Any, *, update: bool = False) -> None:
        """Insert the instrument, detector and physical_filter records (idempotent).

        Parameters
        ----------
        registry
            ``lsst.daf.butler.Registry`` of a writeable Butler.
        update
            Replace existing records that differ instead of failing.

        Raises
        ------
        lsst.daf.butler.registry.ConflictingDefinitionError
            A record exists with other values and ``update`` is false.
        """
        cam = self.camera()
        name = self.getName()
        with registry.transaction():
            registry.syncDimensionData(
                "instrument",
                {
                    "name": name,
                    "detector_max": self.detector_max,
                    "visit_max": EXPOSURE_MAX,
                    "exposure_max": EXPOSURE_MAX,
                    "visit_system": 0,  # one-to-one: a visit is one exposure
                    "class_name": get_full_type_name(self),
                },
                update=update,
            )
            for det in cam.detectors:
                registry.syncDimensionData(
                    "detector",
                    {
                        "instrument": name,
                        "id": det.id,
                        "full_name": det.name,
                        "raft": det.raft,
                        "name_in_raft": det.sensor,
                        "purpose": det.kind,
                    },
                    update=update,
                )
            for pf, band in self.physical_filters().items():
                registry.syncDimensionData(
                    "physical_filter",
                    {"instrument": name, "name": pf, "band": band},
                    update=update,
                )

    def getRawFormatter(self, dataId: DataId) -> type[FormatterV2]:  # noqa: N802 - as getName
        """The formatter of this instrument's raw files (the same for every data ID)."""
        return RawFitsFormatter


class LsstCamInstrument(LdfInstrument):
    """The LSST Camera: 189 science CCDs, 8 guiders and 8 half wavefront CCDs (205)."""

    name = "LSSTCam"
    detector_max = 1000


class LatissInstrument(LdfInstrument):
    """LATISS, AuxTel's imager and slitless spectrograph (one CCD, 'RXX_S00')."""

    name = "LATISS"
    detector_max = 1

    @classmethod
    def physical_filters(cls) -> dict[str, str]:
        """Every ``<filter>~<disperser>`` combination → band of the filter."""
        cam = cls.camera()
        return {
            f"{pf}~{disperser}": band
            for band, pf in cam.filters.items()
            for disperser in cam.dispersers
        }


INSTRUMENT_CLASSES: dict[str, type[LdfInstrument]] = {
    "LSSTCam": LsstCamInstrument,
    "LATISS": LatissInstrument,
}
"""Instrument name → its class."""


def instrument_class(name: str) -> type[LdfInstrument]:
    """The instrument class for ``name`` ('LSSTCam', 'LATISS' or a full class name).

    Raises
    ------
    UserInputError
        Unknown instrument.
    """
    if name in INSTRUMENT_CLASSES:
        return INSTRUMENT_CLASSES[name]
    try:
        cls = doImportType(name)
    except (ImportError, TypeError, ValueError):
        cls = None
    if isinstance(cls, type) and issubclass(cls, LdfInstrument):
        return cls
    raise UserInputError(
        f"unknown instrument {name!r}; choose one of {', '.join(INSTRUMENT_CLASSES)}"
    )
