"""Alert packets as the distribution service reads, converts and frames them.

* :func:`inspect` reads what the service indexes from a wire-format packet (ids, visit,
  position, flux, S/N) and refuses packets that are not alerts of a supported schema.
* :func:`convert` turns a packet into a feed's format: without cutouts, or in an older minor
  version of the schema (fields the older version lacks are dropped; fields it has that the
  newer lacks are null).
* :func:`notification` is the lightweight record of the DMTN-165 split.
* :func:`frame` / :func:`unframe` are the batch framing of the HTTP transport.

Supported schemas are those ``lsst-alert-packet`` ships for the major version the facility
produces (11 today): a feed may ask for any of its minors up to the current one.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import fastavro

from ldf.alerts.models import Delivery, FeedFormat
from ldf.alerts.transcode import _varint, compile_walk, rewrite
from ldf.errors import UserInputError
from ldf.pipelines.alertpacket import WIRE_HEADER, AlertPacketError, AlertSchema

__all__ = [
    "AlertMeta",
    "convert",
    "frame",
    "inspect",
    "notification",
    "supported_schemas",
    "unframe",
]

_CUTOUTS = ("cutoutDifference", "cutoutScience", "cutoutTemplate")
_LEN = struct.Struct(">I")


@lru_cache(maxsize=1)
def supported_schemas() -> dict[int, AlertSchema]:
    """The schemas feeds may be delivered in, by registry id (current major, every minor)."""
    latest = AlertSchema.latest()
    major = latest.schema_id // 100
    out: dict[int, AlertSchema] = {}
    for minor in range(latest.schema_id % 100 + 1):
        try:
            schema = AlertSchema.for_version(major, minor)
        except AlertPacketError:
            continue
        out[schema.schema_id] = schema
    return out


def schema_for_id(schema_id: int) -> AlertSchema:
    """The supported schema with a registry id.

    Raises
    ------
    AlertPacketError
        Not a supported schema.
    """
    schemas = supported_schemas()
    if schema_id not in schemas:
        known = ", ".join(f"{s.version} (id {i})" for i, s in sorted(schemas.items()))
        raise AlertPacketError(f"alert schema id {schema_id} is not supported; supported: {known}")
    return schemas[schema_id]


def schema_for_version(version: str) -> AlertSchema:
    """The supported schema ``'MAJOR.MINOR'``.

    Raises
    ------
    UserInputError
        Not a supported version.
    """
    for schema in supported_schemas().values():
        if schema.version == version:
            return schema
    known = ", ".join(s.version for s in supported_schemas().values())
    raise UserInputError(f"alert schema {version} is not supported; supported: {known}")


@dataclass(slots=True)
class AlertMeta:
    """What the service indexes of one alert."""

    alert_id: int
    schema_id: int
    visit: int
    detector: int
    dia_object_id: int | None
    ra: float
    dec: float
    band: str | None
    mjd: float
    psf_flux: float | None
    psf_flux_err: float | None
    snr: float | None
    reliability: float | None


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _schema_id(packet: bytes) -> int:
    """The schema id of a wire-format packet's header.

    Raises
    ------
    AlertPacketError
        Too short, or not Confluent wire format.
    """
    if len(packet) < WIRE_HEADER.size:
        raise AlertPacketError(f"{len(packet)} bytes is too short for an alert packet")
    magic, schema_id = WIRE_HEADER.unpack_from(packet)
    if magic != 0:
        raise AlertPacketError(f"not Confluent wire format: magic byte {magic}, expected 0")
    return int(schema_id)


def decode(packet: bytes) -> tuple[AlertSchema, dict[str, Any]]:
    """Read a wire-format packet of any supported schema.

    Raises
    ------
    AlertPacketError
        Not an alert packet of a supported schema.
    """
    schema = schema_for_id(_schema_id(packet))
    return schema, schema.deserialize(packet)


@lru_cache(maxsize=8)
def _source_schema(schema_id: int) -> Any:
    schema = schema_for_id(schema_id)
    for f in schema.parsed["fields"]:
        if f["name"] == "diaSource":
            return fastavro.parse_schema(f["type"])
    raise AlertPacketError(f"schema {schema.version} has no diaSource")  # pragma: no cover


# Reading the DiaSource with fastavro cost ~115-135 us an alert, nearly all of an ingest's
# inspection (ingest is the critical path of a visit's distribution: benchmarks/alerts.py);
# fastavro builds every one of its ~100 fields. The walk below reads the same bytes with a
# loop compiled from the schema and keeps only the fields the index needs: ~22 us (measured
# with timeit on synthetic.fast_packets, same process). It handles the DiaSource's types as
# the alert schemas have them (primitives and ["null", primitive] unions) in their canonical
# encoding (one-byte union branches, booleans 0 or 1); any other record shape, and any bytes
# the walk refuses, are read by fastavro, so what is accepted or refused, and why, does not
# change. The tests check both readers agree on every supported schema, on random DiaSources
# and on truncated and corrupted packets.
_INDEXED = frozenset({"diaSourceId", "visit", "detector", "diaObjectId", "ra", "dec", "band",
                      "midpointMjdTai", "psfFlux", "psfFluxErr", "snr", "reliability"})  # fmt: skip
_CODES = {"long": 0, "int": 0, "float": 1, "double": 2, "boolean": 3, "string": 4, "bytes": 5}
_F32 = struct.Struct("<f").unpack_from
_F64 = struct.Struct("<d").unpack_from


@lru_cache(maxsize=8)
def _source_steps(schema_id: int) -> tuple[tuple[str | None, int, bool], ...] | None:
    """The DiaSource walk of a schema: (field kept or None, type code, nullable) per field;
    None if a field's type is not one the walk reads."""
    steps = []
    for f in _source_schema(schema_id)["fields"]:
        t, nullable = f["type"], False
        if isinstance(t, list):
            if len(t) != 2 or t[0] != "null":
                return None
            t, nullable = t[1], True
        kept = f["name"] in _INDEXED
        if isinstance(t, dict):  # a logical type over a primitive: skipped, never kept
            if kept:  # (fastavro would return its logical value, a datetime, say)
                return None
            t = t.get("type")
        if not isinstance(t, str) or t not in _CODES:
            return None
        steps.append((f["name"] if kept else None, _CODES[t], nullable))
    return tuple(steps)


def _walk_source(
    buf: bytes, pos: int, steps: tuple[tuple[str | None, int, bool], ...]
) -> dict[str, Any]:
    """The kept fields of a DiaSource encoded at ``pos``.

    Raises IndexError or struct.error if truncated, ValueError if not canonical or corrupt,
    UnicodeDecodeError on a bad string (the caller then leaves the packet to fastavro)."""
    out: dict[str, Any] = {}
    v: Any = None
    for name, code, nullable in steps:
        if nullable:
            branch = buf[pos]
            pos += 1
            if branch == 0:
                if name is not None:
                    out[name] = None
                continue
            if branch != 2:
                raise ValueError(f"union branch {branch}")
        if code == 0:  # zigzag varint, inlined: most fields are ints or nulls
            b = buf[pos]
            pos += 1
            if b < 0x80:
                v = (b >> 1) ^ -(b & 1)
            else:
                r, shift = b & 0x7F, 7
                while True:
                    b = buf[pos]
                    pos += 1
                    r |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
                    if shift > 63:
                        raise ValueError("varint too long")
                v = (r >> 1) ^ -(r & 1)
        elif code == 1:
            if name is not None:
                v = _F32(buf, pos)[0]
            pos += 4
        elif code == 2:
            if name is not None:
                v = _F64(buf, pos)[0]
            pos += 8
        elif code == 3:
            b = buf[pos]
            pos += 1
            if b > 1:
                raise ValueError(f"boolean byte {b}")
            v = b == 1
        else:
            n, pos = _varint(buf, pos)
            if n < 0 or pos + n > len(buf):
                raise IndexError("string past the packet's end")
            v = bytes(buf[pos : pos + n])
            if code == 4:
                v = v.decode()
            pos += n
        if name is not None:
            out[name] = v
    if pos > len(buf):  # skipped floats are not read: a truncated record ends past the bytes
        raise IndexError("DiaSource past the packet's end")
    return out


def inspect(packet: bytes, *, walk: bool = True) -> AlertMeta:
    """The indexed fields of a wire-format packet (read from its triggering DiaSource).

    Only the head of the packet is decoded: the alert's id, two optional strings and the
    DiaSource record (by a walk compiled from the schema; with ``walk=False``, or for a
    schema the walk does not read, by fastavro). Decoding the whole packet costs ten times
    more (its history of DiaSources), and ingest must keep up with 40,000 alerts a visit.
    This relies on the field order the alert schema has had since version 7 (checked against
    each supported schema in the tests).

    Raises
    ------
    AlertPacketError
        Not an alert packet of a supported schema.
    """
    schema_id = schema_for_id(_schema_id(packet)).schema_id
    source_schema = _source_schema(schema_id)
    try:
        pos = WIRE_HEADER.size
        alert_id, pos = _varint(packet, pos)
        for _ in range(2):  # observation_reason, target_name: ["null", "string"]
            branch, pos = _varint(packet, pos)
            if branch == 1:
                length, pos = _varint(packet, pos)
                pos += length
            elif branch != 0:
                raise AlertPacketError(f"corrupt alert body: union branch {branch}")
        steps = _source_steps(schema_id) if walk else None
        src: Any = None
        if steps is not None:
            try:
                src = _walk_source(packet, pos, steps)
            except (ValueError, IndexError, UnicodeDecodeError, struct.error):
                src = None  # not as the walk reads it: fastavro decides (and says why)
        if src is None:
            src = fastavro.schemaless_reader(
                io.BytesIO(memoryview(packet)[pos:]), source_schema, None
            )
    except (EOFError, ValueError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise AlertPacketError(f"corrupt alert body: {exc}") from exc
    assert isinstance(src, dict)
    if src.get("diaSourceId") != alert_id:
        raise AlertPacketError(
            f"corrupt alert: id {alert_id} but its DiaSource is {src.get('diaSourceId')}"
        )
    try:
        return AlertMeta(
            alert_id=int(alert_id),
            schema_id=schema_id,
            visit=int(src["visit"]),
            detector=int(src["detector"]),
            dia_object_id=src.get("diaObjectId"),
            ra=float(src["ra"]),
            dec=float(src["dec"]),
            band=src.get("band"),
            mjd=float(src["midpointMjdTai"]),
            psf_flux=_finite(src.get("psfFlux")),
            psf_flux_err=_finite(src.get("psfFluxErr")),
            snr=_finite(src.get("snr")),
            reliability=_finite(src.get("reliability")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AlertPacketError(f"alert lacks a required field: {exc}") from exc


def _fit(value: Any, target: Any, named: dict[str, Any]) -> Any:
    """``value`` (decoded with some schema) reshaped to the parsed Avro type ``target``."""
    if isinstance(target, str) and target in named:
        target = named[target]
    if isinstance(target, list):  # a union: null or the first branch the value fits
        if value is None:
            return None
        branches = [t for t in target if t != "null"]
        return _fit(value, branches[0], named) if len(branches) == 1 else value
    if isinstance(target, dict):
        kind = target.get("type")
        if kind == "record":
            named[target["name"]] = target
            return {
                f["name"]: _fit(value.get(f["name"]), f["type"], named) for f in target["fields"]
            }
        if kind == "array":
            return [_fit(v, target["items"], named) for v in value]
    return value


_FITS = b"SIMPLE  ="
"""How every FITS file, hence every non-null cutout, begins."""


def _bytes_field(packet: bytes, pos: int) -> int | None:
    """End of an Avro ``["null", "bytes"]`` value starting at ``pos``, or None if it is not one."""
    if pos >= len(packet):
        return None
    if packet[pos] == 0:
        return pos + 1
    if packet[pos] != 2:
        return None
    try:
        length, after = _varint(packet, pos + 1)
    except (IndexError, AlertPacketError):
        return None
    end = after + length
    return end if length >= 0 and end <= len(packet) else None


def _cutouts_start(packet: bytes) -> int | None:
    """Where the three cutout fields (the alert record's last fields) begin, or None.

    The cutouts are found without decoding the packet: a non-null cutout is a FITS file, so
    for each ``SIMPLE  =`` the bytes before it are tried as the field's union branch and
    length; the guess holds only if the remaining cutout fields then end exactly at the end
    of the packet and the fields before the first non-null one are nulls. Decoding the
    packet to drop its cutouts costs ~1.5 ms; this costs microseconds.
    """
    start = packet.find(_FITS)
    while start != -1:
        for width in range(1, 6):
            s = start - width - 1
            if s < 0 or packet[s] != 2:
                continue
            _length, after = _varint(packet, s + 1)
            if after != start:
                continue
            pos: int | None = s
            fields = 0
            while pos is not None and pos < len(packet) and fields < 3:
                pos = _bytes_field(packet, pos)
                fields += 1
            if pos == len(packet):
                nulls = 3 - fields
                first = s - nulls
                if first >= 0 and packet[first:s] == b"\x00" * nulls:
                    return first
        start = packet.find(_FITS, start + 1)
    if packet.endswith(b"\x00\x00\x00"):
        return len(packet) - 3
    return None


def strip_cutouts(packet: bytes) -> bytes:
    """A packet with its three cutouts null (same schema)."""
    packet = bytes(packet)  # a memoryview from the segments has no find()
    start = _cutouts_start(packet)
    if start is None:
        return convert(packet, cutouts=False, _slow=True)
    return packet[:start] + b"\x00\x00\x00"


def convert(
    packet: bytes, *, cutouts: bool = True, schema_id: int | None = None, _slow: bool = False
) -> bytes:
    """A packet without cutouts and/or in another supported schema; unchanged if neither.

    The result is what decoding the packet, nulling its cutouts (``cutouts=False``), fitting
    the record to the target schema and encoding it gives. Into another schema it is made
    without decoding where the schema pair allows (:mod:`ldf.alerts.transcode`: ~0.08 ms instead of
    ~2.5 ms for an 80 KB packet, the same bytes); otherwise, and for a packet that walk
    refuses, by decoding.

    Raises
    ------
    AlertPacketError
        Not an alert packet of a supported schema.
    """
    _magic, source_id = WIRE_HEADER.unpack_from(packet)
    target_id = schema_id or source_id
    if cutouts and target_id == source_id:
        return packet
    if not _slow:
        if target_id == source_id:
            return strip_cutouts(packet)
        fast = _transcode(packet, target_id, cutouts=cutouts)
        if fast is not None:
            return fast
    packet = bytes(packet)
    _source, record = decode(packet)
    target = schema_for_id(target_id)
    if not cutouts:
        for name in _CUTOUTS:
            record[name] = None
    if target_id != source_id:
        record = _fit(record, target.parsed, {})
    buf = io.BytesIO()
    buf.write(WIRE_HEADER.pack(0, target.schema_id))
    fastavro.schemaless_writer(buf, target.parsed, record)
    return buf.getvalue()


@lru_cache(maxsize=16)
def _transcoder(
    source_id: int, target_id: int, cutouts: bool
) -> tuple[tuple[Any, ...], ...] | None:
    """The compiled walk from one supported schema to another, or None if there is none."""
    source, target = schema_for_id(source_id).parsed, schema_for_id(target_id).parsed
    return compile_walk(source, target, () if cutouts else _CUTOUTS)


def _transcode(packet: bytes, target_id: int, *, cutouts: bool) -> bytes | None:
    """:func:`convert` into another schema without decoding, or None to decode instead (a
    schema pair or a packet the walk does not handle)."""
    schemas = supported_schemas()
    magic, source_id = WIRE_HEADER.unpack_from(packet)
    if magic != 0 or source_id not in schemas or target_id not in schemas:
        return None
    steps = _transcoder(source_id, target_id, cutouts)
    if steps is None:
        return None
    return rewrite(steps, packet, WIRE_HEADER.size, WIRE_HEADER.pack(0, target_id))


def notification(meta: dict[str, Any], *, fetch_url: str | None = None) -> bytes:
    """The lightweight JSON record of one alert (from its indexed fields)."""
    body = {
        "alertId": meta["alert_id"],
        "diaObjectId": meta.get("dia_object_id"),
        "visit": meta["visit"],
        "detector": meta.get("detector"),
        "ra": meta.get("ra"),
        "dec": meta.get("dec"),
        "band": meta.get("band"),
        "midpointMjdTai": meta.get("mjd"),
        "psfFlux": meta.get("psf_flux"),
        "psfFluxErr": meta.get("psf_flux_err"),
        "snr": meta.get("snr"),
        "reliability": meta.get("reliability"),
        "schemaId": meta.get("schema_id"),
    }
    if fetch_url:
        body["url"] = fetch_url.format(alert_id=meta["alert_id"])
    return json.dumps(body, separators=(",", ":")).encode()


def json_loads(body: bytes) -> Any:
    """A JSON entry body (notification or manifest)."""
    return json.loads(body)


def format_of(name: str) -> FeedFormat:
    """A feed format by name, with a one-line error."""
    try:
        return FeedFormat(name)
    except ValueError:
        known = ", ".join(f.value for f in FeedFormat)
        raise UserInputError(f"unknown feed format {name!r}; known: {known}") from None


# -- batch framing ------------------------------------------------------------------------------
# Each entry: 4-byte big-endian length + JSON header, 4-byte length + body. Written by hand:
# it is eight lines, and a multipart parser would cost more than the bytes it frames.


def alert_header(
    position: int, visit: int, fmt: str, alert_id: int, schema_id: int | None
) -> bytes:
    """The framed header of the common entry (a live alert, no extra headers), by formatting:
    json.dumps was 10 % of a server's CPU. The same bytes as ``Delivery.header()`` dumped."""
    return (
        f'{{"position":{position:d},"kind":"alert","visit":{visit:d},'
        f'"format":"{fmt}","alert_id":{alert_id:d}'
        + (f',"schema_id":{schema_id:d}}}' if schema_id is not None else "}")
    ).encode()


def frame(deliveries: list[Delivery]) -> bytes:
    """Frame a batch of deliveries for the HTTP transport."""
    parts: list[bytes] = []
    for d in deliveries:
        if d.kind == "alert" and not d.replay and not d.headers and d.alert_id is not None:
            header = alert_header(d.position, d.visit, d.format, d.alert_id, d.schema_id)
        else:
            header = json.dumps(d.header(), separators=(",", ":")).encode()
        parts += [_LEN.pack(len(header)), header, _LEN.pack(len(d.body)), d.body]
    return b"".join(parts)


def frame_layout(headers: Sequence[bytes], lengths: Sequence[int]) -> tuple[bytearray, list[int]]:
    """A framed batch with its bodies left to fill: the buffer (headers and lengths written)
    and each body's offset in it. For bodies read from disk straight into place
    (`ldf.alerts.segments.SegmentLog.read_into`); the result equals :func:`frame`'s."""
    total = sum(map(len, headers)) + sum(lengths) + 8 * len(headers)
    out = bytearray(total)
    offsets: list[int] = []
    pos = 0
    for header, length in zip(headers, lengths, strict=True):
        hl = len(header)
        out[pos : pos + 4] = _LEN.pack(hl)
        out[pos + 4 : pos + 4 + hl] = header
        out[pos + 4 + hl : pos + 8 + hl] = _LEN.pack(length)
        pos += 8 + hl
        offsets.append(pos)
        pos += length
    return out, offsets


def unframe(data: bytes | memoryview) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The (header, body) pairs of a framed batch.

    Raises
    ------
    UserInputError
        The batch is truncated or malformed.
    """
    view = memoryview(data)
    pos, end = 0, len(view)
    while pos < end:
        if pos + 4 > end:
            raise UserInputError("truncated alert batch (header length)")
        (hlen,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + hlen + 4 > end:
            raise UserInputError("truncated alert batch (header)")
        header = json.loads(bytes(view[pos : pos + hlen]))
        pos += hlen
        (blen,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + blen > end:
            raise UserInputError("truncated alert batch (body)")
        yield header, bytes(view[pos : pos + blen])
        pos += blen


def pack_packets(packets: list[bytes]) -> bytes:
    """Packets for the ingest endpoint: each as a 4-byte big-endian length, then its bytes."""
    return b"".join(iter_packed(packets))


def packed_size(packets: Sequence[bytes]) -> int:
    """The length of :func:`pack_packets`' result, without building it."""
    return sum(map(len, packets)) + 4 * len(packets)


def iter_packed(packets: Iterable[bytes], chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """:func:`pack_packets`' bytes in pieces of about ``chunk_bytes``, to stream a request
    body. A whole 40 MB body is one allocation above glibc's largest mmap threshold: fresh
    pages on every request, which a virtual machine faults in at under 1 GB/s (perf: 8 % of
    the machine's CPU in benchmarks/alerts.py's producers); pieces of ~1 MB reuse the heap."""
    parts: list[bytes] = []
    size = 0
    for p in packets:
        parts += [_LEN.pack(len(p)), p]
        size += 4 + len(p)
        if size >= chunk_bytes:
            yield b"".join(parts)
            parts, size = [], 0
    if parts:
        yield b"".join(parts)


def unpack_packets(data: bytes | memoryview, *, views: bool = False) -> list[Any]:
    """The packets of an ingest body: copies, or with ``views`` memoryviews into ``data``
    (no copy; they keep all of ``data`` alive while any is).

    Raises
    ------
    UserInputError
        The body is truncated.
    """
    view = memoryview(data)
    out: list[Any] = []
    pos, end = 0, len(view)
    while pos < end:
        if pos + 4 > end:
            raise UserInputError("truncated packet list (length)")
        (n,) = _LEN.unpack_from(view, pos)
        pos += 4
        if pos + n > end:
            raise UserInputError(f"truncated packet list: packet of {n} bytes cut short")
        out.append(view[pos : pos + n] if views else bytes(view[pos : pos + n]))
        pos += n
    return out
