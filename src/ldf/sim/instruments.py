"""The simulated cameras: LSSTCam and LATISS, down to each amplifier's electronics.

Geometry follows Rubin's camera description (``obs_lsst``): LSSTCam has 21 science rafts
(R01..R43 without the corners) of 3×3 sensors (S00..S22) and 4 corner rafts with two guider
CCDs (SG0, SG1) and two half-height wavefront CCDs (SW0, SW1). Detector ids are Rubin's:
``raft_index * 9 + sensor_index`` for the 189 science CCDs in raft order R01, R02, ..., R43,
then 189..204 for the corner rafts R00, R04, R40, R44 (SG0, SG1, SW0, SW1 each).

Every CCD has 16 amplifiers in two rows: C10..C17 along the bottom (y = 0), C07..C00 along the
top. Raw amplifier images are 576 columns × 2048 rows for both vendors:

* ITL: data 509 × 2000, serial prescan 3, serial overscan 64, parallel overscan 48
  (assembled CCD 4072 × 4000);
* E2V: data 512 × 2002, serial prescan 10, serial overscan 54, parallel overscan 46
  (assembled CCD 4096 × 4004).

Electronics (gain, read noise, bias level, dark current, full well) are drawn once per
(instrument, detector, amplifier) from a fixed *hardware* seed, so the simulated camera is the
same camera every night; the night's seed never touches them.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from ldf.errors import NotFoundError, UserInputError
from ldf.sim.models import OBS_ID_PREFIX

__all__ = [
    "ADC_MAX",
    "HARDWARE_SEED",
    "INSTRUMENT_NAMES",
    "Amplifier",
    "Detector",
    "Instrument",
    "get_instrument",
    "hardware_rng",
]

HARDWARE_SEED = 20_260_101
"""Seed of everything that is a property of the hardware (electronics, flat pattern, hot pixels)."""

ADC_MAX = 262_143
"""Largest value the 18-bit ADC of Rubin's readout electronics can produce (ADU)."""

MIN_AMP_PIXELS = 16
"""Smallest data section (per axis) an amplifier keeps when an instrument is scaled down."""

INSTRUMENT_NAMES = ("LSSTCam", "LATISS")
"""Instruments :func:`get_instrument` knows."""

_SCIENCE_RAFTS = (
    "R01", "R02", "R03",
    "R10", "R11", "R12", "R13", "R14",
    "R20", "R21", "R22", "R23", "R24",
    "R30", "R31", "R32", "R33", "R34",
    "R41", "R42", "R43",
)  # fmt: skip
_CORNER_RAFTS = ("R00", "R04", "R40", "R44")
_ITL_RAFTS = frozenset({"R01", "R02", "R03", "R10", "R20", "R41", "R42", "R43"})
_SENSORS = ("S00", "S01", "S02", "S10", "S11", "S12", "S20", "S21", "S22")
_AMP_NAMES = (
    "C10", "C11", "C12", "C13", "C14", "C15", "C16", "C17",
    "C07", "C06", "C05", "C04", "C03", "C02", "C01", "C00",
)  # fmt: skip

_RAFT_PITCH_MM = 127.0
_SENSOR_PITCH_MM = 42.25


@dataclass(frozen=True)
class _AmpGeometry:
    """Pixel counts of one vendor's amplifier (unscaled)."""

    nx: int
    ny: int
    prescan: int
    serial_overscan: int
    parallel_overscan: int


_VENDOR_GEOMETRY = {
    "ITL": _AmpGeometry(nx=509, ny=2000, prescan=3, serial_overscan=64, parallel_overscan=48),
    "E2V": _AmpGeometry(nx=512, ny=2002, prescan=10, serial_overscan=54, parallel_overscan=46),
}

# Readout direction of the two amplifier rows, as obs_lsst describes them (flipX, flipY).
_VENDOR_FLIPS = {
    "ITL": {"bottom": (True, False), "top": (True, True)},
    "E2V": {"bottom": (True, False), "top": (False, True)},
}

# Zero points: AB magnitude that gives 1 e-/s, at airmass 1, through the whole system
# (atmosphere, 8.4 m-class mirror with 6.4 m effective diameter, filter, detector QE).
# After Rubin's SMTN-002 throughput model (rounded); ``LSST_EXTINCTION`` is the atmospheric
# extinction per airmass of the same note.
LSST_ZERO_POINTS = {"u": 26.52, "g": 28.51, "r": 28.36, "i": 28.17, "z": 27.78, "y": 26.82}
LSST_EXTINCTION = {"u": 0.47, "g": 0.21, "r": 0.13, "i": 0.10, "z": 0.07, "y": 0.17}
# AuxTel is a 1.2 m telescope: ~33× less collecting area than Rubin's (−3.8 mag); 'white' is
# the open (empty) filter position used with the dispersers.
_LATISS_OFFSET = -3.8
LATISS_ZERO_POINTS = {
    b: zp + _LATISS_OFFSET for b, zp in LSST_ZERO_POINTS.items() if b in "grizy"
} | {"white": 29.4 + _LATISS_OFFSET}
LATISS_EXTINCTION = {b: k for b, k in LSST_EXTINCTION.items() if b in "grizy"} | {"white": 0.15}


def hardware_rng(instrument: str, *keys: int) -> np.random.Generator:
    """A generator for a fixed property of the hardware (same every night).

    Parameters
    ----------
    instrument
        Instrument name; hashed with CRC-32 (stable across processes, unlike ``hash``).
    *keys
        Further integers, e.g. detector id, amplifier index, and a purpose code.
    """
    ss = np.random.SeedSequence([HARDWARE_SEED, zlib.crc32(instrument.encode()), *keys])
    return np.random.Generator(np.random.PCG64(ss))


@dataclass(frozen=True)
class Amplifier:
    """One readout amplifier (a 'segment') of a CCD and its electronics."""

    name: str
    """Rubin's amplifier name, C10..C17 (bottom row), C07..C00 (top row)."""
    index: int
    """Position in readout/HDU order (0..15), the order of :attr:`Detector.amplifiers`."""
    x0: int
    """First column of the data section in the assembled detector image."""
    y0: int
    """First row of the data section in the assembled detector image."""
    nx: int
    """Columns of the data section."""
    ny: int
    """Rows of the data section."""
    prescan: int
    """Serial prescan columns read before the data in each row."""
    serial_overscan: int
    """Serial overscan columns read after the data in each row."""
    parallel_overscan: int
    """Parallel overscan rows read after the data rows."""
    flip_x: bool
    """The raw image's columns run opposite to the assembled image's x."""
    flip_y: bool
    """The raw image's rows run opposite to the assembled image's y."""
    gain: float
    """Electrons per ADU."""
    read_noise: float
    """Read noise, electrons rms."""
    bias_level: float
    """Mean bias (ADU)."""
    dark_current: float
    """Dark current, electrons per second per pixel."""
    saturation: float
    """Signal above bias at which the pixel's well is full (ADU); ``saturation * gain`` e-."""

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Data section in the assembled image as ``(x0, y0, nx, ny)``."""
        return (self.x0, self.y0, self.nx, self.ny)

    @property
    def raw_shape(self) -> tuple[int, int]:
        """Shape ``(rows, cols)`` of the raw amplifier image, overscans included."""
        return (self.ny + self.parallel_overscan, self.prescan + self.nx + self.serial_overscan)

    @property
    def raw_data_slice(self) -> tuple[slice, slice]:
        """Where the data section lies in the raw amplifier image (readout order)."""
        return (slice(0, self.ny), slice(self.prescan, self.prescan + self.nx))

    @property
    def raw_serial_overscan_slice(self) -> tuple[slice, slice]:
        """Serial overscan columns of the data rows in the raw amplifier image."""
        c0 = self.prescan + self.nx
        return (slice(0, self.ny), slice(c0, c0 + self.serial_overscan))

    @property
    def full_well(self) -> float:
        """Full well in electrons."""
        return self.saturation * self.gain

    def assembled_slice(self) -> tuple[slice, slice]:
        """Numpy slice of the data section in the assembled image (rows, cols)."""
        return (slice(self.y0, self.y0 + self.ny), slice(self.x0, self.x0 + self.nx))


@dataclass(frozen=True)
class Detector:
    """One CCD: its place in the focal plane and its amplifiers."""

    id: int
    """Rubin's detector number (0..188 science, then guiders and wavefront sensors)."""
    name: str
    """Rubin's name ``Rxx_Syy`` (``R00_SG0`` guider, ``R00_SW0`` wavefront)."""
    kind: str
    """'SCIENCE', 'WAVEFRONT' or 'GUIDER'."""
    nx: int
    """Columns of the assembled image."""
    ny: int
    """Rows of the assembled image."""
    amplifiers: tuple[Amplifier, ...]
    """Amplifiers in readout (HDU) order."""
    fp_x_mm: float
    """Focal-plane x of the detector centre (mm)."""
    fp_y_mm: float
    """Focal-plane y of the detector centre (mm)."""
    serial: str
    """Manufacturer serial number (simulated)."""
    vendor: str
    """'ITL' or 'E2V'."""

    @property
    def raft(self) -> str:
        """Raft part of the name, e.g. 'R22'."""
        return self.name.split("_")[0]

    @property
    def sensor(self) -> str:
        """Sensor part of the name, e.g. 'S11'."""
        return self.name.split("_")[1]

    def amplifier(self, name: str) -> Amplifier:
        """The amplifier called ``name``.

        Raises
        ------
        NotFoundError
            No such amplifier.
        """
        for amp in self.amplifiers:
            if amp.name == name:
                return amp
        raise NotFoundError(f"detector {self.name} has no amplifier {name!r}")


@dataclass(frozen=True, eq=False)
class Instrument:
    """A camera: its detectors, plate scale, filters and photometric calibration."""

    name: str
    """'LSSTCam' or 'LATISS'."""
    obs_id_prefix: str
    """Two-letter code of obs_id ('MC', 'AT')."""
    detectors: tuple[Detector, ...]
    """All detectors, in id order."""
    pixel_scale_arcsec: float
    """Arcseconds per pixel."""
    pixel_size_um: float
    """Pixel pitch in micrometres."""
    filters: dict[str, str]
    """Band → physical filter name."""
    dispersers: tuple[str, ...] = ()
    """Dispersers in the beam (LATISS); 'empty' means none."""
    zero_points: dict[str, float] = field(default_factory=dict)
    """Band → AB magnitude giving 1 e-/s at airmass 1 (see module constants)."""
    extinction: dict[str, float] = field(default_factory=dict)
    """Band → atmospheric extinction, magnitudes per airmass."""
    vignetting_radius_mm: float = 320.0
    """Focal-plane radius where the simulated vignetting model is normalised."""
    scale: float = 1.0
    """Factor the amplifier data sections were shrunk by (1 = real size)."""

    def detector(self, name: str) -> Detector:
        """The detector called ``name`` (e.g. 'R22_S11').

        Raises
        ------
        NotFoundError
            No such detector in this instrument.
        """
        det = self._by_name().get(name)
        if det is None:
            raise NotFoundError(f"{self.name} has no detector {name!r}")
        return det

    def detector_by_id(self, det_id: int) -> Detector:
        """The detector numbered ``det_id``.

        Raises
        ------
        NotFoundError
            No such detector id.
        """
        for det in self.detectors:
            if det.id == det_id:
                return det
        raise NotFoundError(f"{self.name} has no detector id {det_id}")

    def science_detectors(self) -> tuple[Detector, ...]:
        """The science CCDs, in id order."""
        return tuple(d for d in self.detectors if d.kind == "SCIENCE")

    def physical_filter(self, band: str) -> str:
        """Physical filter used for ``band``.

        Raises
        ------
        UserInputError
            The instrument has no filter for that band.
        """
        try:
            return self.filters[band]
        except KeyError:
            raise UserInputError(
                f"{self.name} has no filter for band {band!r}; bands: {sorted(self.filters)}"
            ) from None

    def _by_name(self) -> dict[str, Detector]:
        cache: dict[str, Detector] | None = self.__dict__.get("_name_cache")
        if cache is None:
            cache = {d.name: d for d in self.detectors}
            object.__setattr__(self, "_name_cache", cache)
        return cache


def _scaled(n: int, scale: float) -> int:
    return max(MIN_AMP_PIXELS, round(n * scale))


def _make_amplifiers(
    instrument: str, det_id: int, vendor: str, scale: float, names: tuple[str, ...]
) -> tuple[Amplifier, ...]:
    geom = _VENDOR_GEOMETRY[vendor]
    nx, ny = _scaled(geom.nx, scale), _scaled(geom.ny, scale)
    amps = []
    for index, name in enumerate(names):
        top = name.startswith("C0")
        col = int(name[2])
        flip_x, flip_y = _VENDOR_FLIPS[vendor]["top" if top else "bottom"]
        rng = hardware_rng(instrument, det_id, index, 1)
        gain = float(rng.uniform(1.35, 1.65))
        # e2v sensors are a little quieter than ITL's in Rubin's measurements.
        read_noise = float(rng.uniform(5.0, 7.0) if vendor == "E2V" else rng.uniform(6.0, 9.0))
        bias_level = float(rng.uniform(20_000.0, 30_000.0))
        dark_current = float(0.002 * rng.lognormal(0.0, 0.2))
        full_well_e = float(rng.uniform(100_000.0, 150_000.0))
        amps.append(
            Amplifier(
                name=name,
                index=index,
                x0=col * nx,
                y0=ny if top else 0,
                nx=nx,
                ny=ny,
                prescan=geom.prescan,
                serial_overscan=geom.serial_overscan,
                parallel_overscan=geom.parallel_overscan,
                flip_x=flip_x,
                flip_y=flip_y,
                gain=round(gain, 5),
                read_noise=round(read_noise, 3),
                bias_level=round(bias_level, 2),
                dark_current=round(dark_current, 6),
                saturation=float(round(full_well_e / gain)),
            )
        )
    return tuple(amps)


def _serial(instrument: str, det_id: int, vendor: str) -> str:
    number = int(hardware_rng(instrument, det_id, 0, 2).integers(1, 400))
    return f"ITL-3800C-{number:03d}" if vendor == "ITL" else f"E2V-CCD250-{number:03d}"


def _make_detector(
    instrument: str,
    det_id: int,
    name: str,
    kind: str,
    vendor: str,
    fp: tuple[float, float],
    scale: float,
    amp_names: tuple[str, ...] = _AMP_NAMES,
) -> Detector:
    amps = _make_amplifiers(instrument, det_id, vendor, scale, amp_names)
    rows = 2 if any(a.name.startswith("C0") for a in amps) else 1
    return Detector(
        id=det_id,
        name=name,
        kind=kind,
        nx=8 * amps[0].nx,
        ny=rows * amps[0].ny,
        amplifiers=amps,
        fp_x_mm=fp[0],
        fp_y_mm=fp[1],
        serial=_serial(instrument, det_id, vendor),
        vendor=vendor,
    )


def _raft_centre(raft: str) -> tuple[float, float]:
    row, col = int(raft[1]), int(raft[2])
    return ((col - 2) * _RAFT_PITCH_MM, (row - 2) * _RAFT_PITCH_MM)


def _build_lsstcam(scale: float) -> Instrument:
    detectors: list[Detector] = []
    for ri, raft in enumerate(_SCIENCE_RAFTS):
        rx, ry = _raft_centre(raft)
        vendor = "ITL" if raft in _ITL_RAFTS else "E2V"
        for si, sensor in enumerate(_SENSORS):
            row, col = int(sensor[1]), int(sensor[2])
            fp = (rx + (col - 1) * _SENSOR_PITCH_MM, ry + (row - 1) * _SENSOR_PITCH_MM)
            detectors.append(
                _make_detector(
                    "LSSTCam", ri * 9 + si, f"{raft}_{sensor}", "SCIENCE", vendor, fp, scale
                )
            )
    # Corner rafts: wavefront sensors in the quadrant nearest the optical axis, guiders in the
    # two side quadrants. Positions are approximate (Rubin's corner rafts are also rotated).
    half = _SENSOR_PITCH_MM / 2
    det_id = 189
    for raft in _CORNER_RAFTS:
        rx, ry = _raft_centre(raft)
        sx, sy = math.copysign(1.0, rx), math.copysign(1.0, ry)
        layout = {
            "SG0": ("GUIDER", (rx + sx * half, ry - sy * half)),
            "SG1": ("GUIDER", (rx - sx * half, ry + sy * half)),
            "SW0": ("WAVEFRONT", (rx - sx * half, ry - sy * half + 10.25)),
            "SW1": ("WAVEFRONT", (rx - sx * half, ry - sy * half - 10.25)),
        }
        for sensor, (kind, fp) in layout.items():
            amp_names = _AMP_NAMES if kind == "GUIDER" else _AMP_NAMES[:8]
            detectors.append(
                _make_detector(
                    "LSSTCam", det_id, f"{raft}_{sensor}", kind, "ITL", fp, scale, amp_names
                )
            )
            det_id += 1
    return Instrument(
        name="LSSTCam",
        obs_id_prefix=OBS_ID_PREFIX["LSSTCam"],
        detectors=tuple(detectors),
        pixel_scale_arcsec=0.2,
        pixel_size_um=10.0,
        filters={"u": "u_24", "g": "g_6", "r": "r_57", "i": "i_39", "z": "z_20", "y": "y_10"},
        zero_points=dict(LSST_ZERO_POINTS),
        extinction=dict(LSST_EXTINCTION),
        vignetting_radius_mm=320.0,
        scale=scale,
    )


def _build_latiss(scale: float) -> Instrument:
    det = _make_detector("LATISS", 0, "RXX_S00", "SCIENCE", "ITL", (0.0, 0.0), scale)
    return Instrument(
        name="LATISS",
        obs_id_prefix=OBS_ID_PREFIX["LATISS"],
        detectors=(det,),
        pixel_scale_arcsec=0.1,
        pixel_size_um=10.0,
        filters={
            "g": "SDSSg_65mm",
            "r": "SDSSr_65mm",
            "i": "SDSSi_65mm",
            "z": "SDSSz_65mm",
            "y": "SDSSy_65mm",
            "white": "empty",
        },
        dispersers=("empty", "holo4_003", "blue300lpmm_qn1"),
        zero_points=dict(LATISS_ZERO_POINTS),
        extinction=dict(LATISS_EXTINCTION),
        vignetting_radius_mm=40.0,
        scale=scale,
    )


def get_instrument(name: str, scale: float = 1.0) -> Instrument:
    """The simulated instrument called ``name``.

    Parameters
    ----------
    name
        'LSSTCam' or 'LATISS'.
    scale
        0 < scale ≤ 1: shrink each amplifier's data section by this factor (at least
        16 pixels per axis). Names, amplifiers, overscans, electronics and pixel scale are
        unchanged; each detector simply covers less sky around its centre.

    Raises
    ------
    UserInputError
        Unknown instrument name or a scale outside (0, 1].
    """
    if name not in INSTRUMENT_NAMES:
        raise UserInputError(
            f"unknown instrument {name!r}; choose one of {', '.join(INSTRUMENT_NAMES)}"
        )
    if not isinstance(scale, int | float) or not (0.0 < scale <= 1.0) or math.isnan(scale):
        raise UserInputError(f"instrument scale must be in (0, 1], got {scale!r}")
    return _get_instrument(name, float(scale))


@lru_cache(maxsize=16)
def _get_instrument(name: str, scale: float) -> Instrument:
    return _build_lsstcam(scale) if name == "LSSTCam" else _build_latiss(scale)
