"""Realistic synthetic alert packets, for the smoke test, the tests and the benchmark.

Each packet is a valid alert of the latest schema with a DiaSource, a DiaObject, a history of
previous DiaSources and three FITS cutouts of Gaussian noise, so its size (default ~80 KB,
DMTN-102's figure) and its compressibility are those of a real alert. Alert ids are
``visit * 100_000 + index`` so a test knows what to expect.
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Any

import numpy as np
from astropy.io import fits

from ldf.pipelines.alertpacket import AlertSchema

__all__ = ["alert_id_for", "make_alert", "make_packets"]

_BANDS = ("u", "g", "r", "i", "z", "y")
_DEFAULTS = {"long": 0, "int": 0, "float": 0.0, "double": 0.0, "boolean": False, "string": ""}


def alert_id_for(visit: int, index: int) -> int:
    """The alertId :func:`make_alert` gives the ``index``-th alert of a visit."""
    return int(visit) * 100_000 + int(index)


@lru_cache(maxsize=8)
def _cutouts(side: int, count: int = 8) -> tuple[bytes, ...]:
    """A few noise cutouts of one size, as FITS bytes (float32, like Rubin's)."""
    rng = np.random.default_rng(side)
    out = []
    for _ in range(count):
        data = rng.normal(0.0, 50.0, size=(side, side)).astype(np.float32)
        buf = io.BytesIO()
        fits.HDUList([fits.PrimaryHDU(data)]).writeto(buf)
        out.append(buf.getvalue())
    return tuple(out)


def _record(schema: AlertSchema, name: str) -> dict[str, Any]:
    return {f.name: None if f.nullable else _DEFAULTS.get(f.kind) for f in schema.field_types(name)}


def make_alert(
    visit: int,
    index: int,
    *,
    detector: int = 94,
    n_previous: int = 10,
    cutout_side: int = 75,
    schema: AlertSchema | None = None,
) -> dict[str, Any]:
    """One alert record (not serialized)."""
    schema = schema or AlertSchema.latest()
    alert_id = alert_id_for(visit, index)
    rng = np.random.default_rng(alert_id)
    band = _BANDS[(visit + index) % len(_BANDS)]
    object_id = 1_000_000_000 + (alert_id % 7_000_000)
    ra, dec = float(rng.uniform(0, 360)), float(rng.uniform(-80, 20))
    snr = float(5 + rng.exponential(10))
    src = _record(schema, "diaSource")
    src.update(
        diaSourceId=alert_id, visit=int(visit), detector=int(detector), diaObjectId=object_id,
        midpointMjdTai=61000.0 + visit / 1e5, ra=ra, dec=dec, x=float(rng.uniform(0, 4000)),
        y=float(rng.uniform(0, 4000)), psfFlux=snr * 300.0, psfFluxErr=300.0, snr=snr,
        band=band, reliability=float(rng.uniform(0.5, 1.0)), timeProcessedMjdTai=61000.0,
        bboxSize=cutout_side,
    )  # fmt: skip
    previous = []
    for k in range(n_previous):
        p = dict(src)
        p.update(
            diaSourceId=alert_id + 10_000_000_000 + k,
            visit=int(visit) - 1000 * (k + 1),
            midpointMjdTai=src["midpointMjdTai"] - 3.0 * (k + 1),
        )
        previous.append(p)
    obj = _record(schema, "diaObject")
    obj.update(diaObjectId=object_id, ra=ra, dec=dec, validityStartMjdTai=61000.0)
    cut = _cutouts(cutout_side)
    alert = _record(schema, "alert")
    alert.update(
        diaSourceId=alert_id,
        diaSource=src,
        prvDiaSources=previous,
        prvDiaForcedSources=None,
        diaObject=obj,
        cutoutDifference=cut[index % len(cut)],
        cutoutScience=cut[(index + 1) % len(cut)],
        cutoutTemplate=cut[(index + 2) % len(cut)],
    )
    return alert


def make_packets(
    visit: int,
    count: int,
    *,
    start: int = 0,
    detector: int = 94,
    n_previous: int = 10,
    cutout_side: int = 75,
) -> list[bytes]:
    """Serialized alerts ``start .. start + count - 1`` of a visit (Confluent wire format)."""
    schema = AlertSchema.latest()
    return [
        schema.serialize(
            make_alert(
                visit,
                i,
                detector=detector,
                n_previous=n_previous,
                cutout_side=cutout_side,
                schema=schema,
            )
        )
        for i in range(start, start + count)
    ]


def _zigzag_varint(value: int) -> bytes:
    n = (value << 1) ^ (value >> 63)
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def fast_packets(visit: int, count: int, *, templates: int = 16, **options: Any) -> list[bytes]:
    """Like :func:`make_packets`, for benchmarks: ``templates`` packets are serialized and the
    rest are copies with their alertId (and their DiaSource's id) rewritten in place.

    Every packet is a valid alert with a distinct alertId; DiaObjects and histories repeat
    every ``templates`` alerts. Rewriting works because every alertId of a visit encodes to
    the same number of varint bytes (checked).
    """
    base = make_packets(visit, min(templates, count), **options)
    first = _zigzag_varint(alert_id_for(visit, 0))
    width = len(first)
    # alert.diaSourceId right after the 5-byte header, then two null unions (1 byte each),
    # then diaSource.diaSourceId.
    offsets = (5, 5 + width + 2)
    out = []
    for i in range(count):
        template = base[i % len(base)]
        encoded = _zigzag_varint(alert_id_for(visit, i))
        if len(encoded) != width:
            raise ValueError("alertIds of this visit do not encode to one width")
        buf = bytearray(template)
        for off in offsets:
            buf[off : off + width] = encoded
        out.append(bytes(buf))
    return out
