"""Converting alert packets between schema versions: the walk over the encoded bytes gives
what decoding, fitting and encoding give, byte for byte, or leaves the packet to that path."""

from __future__ import annotations

import io
import itertools
import struct
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ldf.alerts import formats, transcode
from ldf.alerts.synthetic import make_alert
from ldf.pipelines.alertpacket import AlertPacketError, AlertSchema
from tests.alerts.conftest import VISIT

SCHEMAS = formats.supported_schemas()
LATEST = AlertSchema.latest().schema_id
PAIRS = [(s, t) for s, t in itertools.permutations(sorted(SCHEMAS), 2)]
"""Every (source, target) pair of supported schemas: older minors and back."""
OLDER = [t for t in sorted(SCHEMAS) if t != LATEST]
RECORDS = ("diaSource", "diaForcedSource", "diaObject", "ssSource", "mpc_orbits")
CUTOUTS = ("cutoutDifference", "cutoutScience", "cutoutTemplate")


@lru_cache(maxsize=8)
def packets(schema_id: int, count: int = 3, cutouts: bool = True) -> tuple[bytes, ...]:
    """Full-size (~80 KB) synthetic packets written in one schema."""
    schema = SCHEMAS[schema_id]
    out = []
    for i in range(count):
        alert = make_alert(VISIT, i, schema=schema)
        if not cutouts:
            alert.update(dict.fromkeys(CUTOUTS))
        out.append(schema.serialize(alert))
    return tuple(out)


def slow(packet: bytes, target_id: int, cutouts: bool) -> bytes:
    return formats.convert(packet, cutouts=cutouts, schema_id=target_id, _slow=True)


def expected(alert: dict[str, Any], target: AlertSchema, cutouts: bool) -> dict[str, Any]:
    """What the target schema's reader should see: the fields it has, null where the source
    has none, and null cutouts without cutouts."""
    names = {r: [f.name for f in target.field_types(r)] for r in ("alert", *RECORDS)}

    def fit(value: Any, record: str) -> Any:
        return None if value is None else {n: value.get(n) for n in names[record]}

    out = fit(alert, "alert")
    out["diaSource"] = fit(alert["diaSource"], "diaSource")
    for key, record in (("prvDiaSources", "diaSource"), ("prvDiaForcedSources", "diaForcedSource")):
        if alert[key] is not None:
            out[key] = [fit(v, record) for v in alert[key]]
    for key in ("diaObject", "ssSource", "mpc_orbits"):
        out[key] = fit(alert[key], key)
    if not cutouts:
        out.update(dict.fromkeys(CUTOUTS))
    return out


@pytest.mark.parametrize("cutouts", [True, False])
@pytest.mark.parametrize(("source_id", "target_id"), PAIRS)
def test_conversion_without_decoding_gives_the_same_bytes(
    source_id: int, target_id: int, cutouts: bool
) -> None:
    source, target = SCHEMAS[source_id], SCHEMAS[target_id]
    for packet in packets(source_id):
        fast = formats._transcode(packet, target_id, cutouts=cutouts)
        assert fast is not None  # the walk handled it: no decoding
        assert fast == slow(packet, target_id, cutouts)
        assert formats.convert(packet, cutouts=cutouts, schema_id=target_id) == fast
        assert formats.convert(memoryview(packet), cutouts=cutouts, schema_id=target_id) == fast
        got = target.deserialize(fast)
        assert got == expected(source.deserialize(packet), target, cutouts)
        if cutouts:
            assert got["cutoutScience"] is not None
        else:
            assert len(fast) < len(packet) / 10
    if target_id < source_id:  # 11.0 lacks what 11.1 added, e.g. the exposure time
        assert "exposureTime" not in got["diaSource"]


@pytest.mark.parametrize("cutouts", [True, False])
@pytest.mark.parametrize(("source_id", "target_id"), PAIRS)
def test_packet_with_null_cutouts_and_no_history(
    source_id: int, target_id: int, cutouts: bool
) -> None:
    source, target = SCHEMAS[source_id], SCHEMAS[target_id]
    for packet in packets(source_id, cutouts=False):
        alert = source.deserialize(packet)
        for history in ([], None):
            alert["prvDiaSources"] = history
            bare = source.serialize(alert)
            fast = formats._transcode(bare, target_id, cutouts=cutouts)
            assert fast is not None
            assert fast == slow(bare, target_id, cutouts)
            got = target.deserialize(fast)
            assert got == expected(alert, target, cutouts)
            assert [got[c] for c in CUTOUTS] == [None] * 3
            assert got["prvDiaSources"] == history
        # With or without cutouts is the same packet when it has none.
        assert fast == formats.convert(bare, cutouts=not cutouts, schema_id=target_id)


# -- random alerts --------------------------------------------------------------------------------

_PRIMITIVE = {
    "null": st.none(),
    "boolean": st.booleans(),
    "int": st.integers(-(2**31), 2**31 - 1),
    "long": st.integers(-(2**63), 2**63 - 1),
    "float": st.floats(width=32),
    "double": st.floats(),
    "string": st.text(max_size=80),  # past 63 bytes a length takes two bytes
    "bytes": st.binary(max_size=100),
}


def _values(avro_type: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Any value of a parsed Avro type (every field, null or not, any float)."""
    if isinstance(avro_type, str):
        return _values(named[avro_type], named) if avro_type in named else _PRIMITIVE[avro_type]
    if isinstance(avro_type, list):
        return st.one_of([_values(t, named) for t in avro_type])
    kind = avro_type["type"]
    if kind == "record":
        fields = {f["name"]: _values(f["type"], named) for f in avro_type["fields"]}
        return st.fixed_dictionaries(fields)
    if kind == "array":
        return st.lists(_values(avro_type["items"], named), max_size=2)
    if avro_type.get("logicalType") == "timestamp-micros":
        return st.datetimes(
            min_value=datetime(1800, 1, 1), max_value=datetime(2300, 1, 1), timezones=st.just(UTC)
        )
    return _values(kind, named)


@pytest.mark.parametrize("source_id", sorted(SCHEMAS))
@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_alerts_convert_to_the_same_bytes(source_id: int, data: st.DataObject) -> None:
    schema = SCHEMAS[source_id]
    alert = data.draw(_values(schema.parsed, schema.parsed["__named_schemas"]))
    packet = schema.serialize(alert)
    for target_id, cutouts in itertools.product(SCHEMAS, (True, False)):
        if target_id != source_id:
            fast = formats._transcode(packet, target_id, cutouts=cutouts)
            assert fast is not None
            assert fast == slow(packet, target_id, cutouts)


# -- packets the walk refuses ---------------------------------------------------------------------


def _varint(value: int) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, "long", value)
    return buf.getvalue()


def _latest_packet(**changes: Any) -> bytes:
    schema = SCHEMAS[LATEST]
    alert = make_alert(VISIT, 0, n_previous=2, cutout_side=30, schema=schema)
    for key, value in changes.items():
        record, _, field = key.partition("__")
        if field:
            alert[record][field] = value
        else:
            alert[record] = value
    return schema.serialize(alert)


def _replace_once(packet: bytes, old: bytes, new: bytes) -> bytes:
    assert packet.count(old) == 1
    return packet.replace(old, new)


def _padded(packet: bytes, alert_id: int) -> bytes:
    """The packet with its alert id as a varint one byte longer than it needs."""
    canonical = _varint(alert_id)
    assert packet[5 : 5 + len(canonical)] == canonical
    return (
        packet[:5]
        + canonical[:-1]
        + bytes([canonical[-1] | 0x80, 0])
        + packet[5 + len(canonical) :]
    )


def _two_blocks(packet: bytes, history: list[dict[str, Any]]) -> bytes:
    """The packet with its history of two DiaSources as two blocks of one."""
    source_schema = formats._source_schema(LATEST)
    items = []
    for previous in history:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, source_schema, previous)
        items.append(buf.getvalue())
    one_block = b"\x02\x04" + b"".join(items) + b"\x00"
    two_blocks = b"\x02" + b"".join(b"\x02" + item for item in items) + b"\x00"
    return _replace_once(packet, one_block, two_blocks)


@pytest.mark.parametrize("target_id", OLDER)
def test_non_canonical_packets_are_decoded_and_normalised(target_id: int) -> None:
    sentinel = struct.pack("<f", 1234.5)
    marked = _latest_packet(
        observation_reason="abcé", diaSource__yErr=1234.5, diaSource__centroid_flag=True
    )
    cases = [
        (marked, _replace_once(marked, b"\x02\x0aabc\xc3\xa9", b"\x02\x8a\x00abc\xc3\xa9")),
        (marked, _replace_once(marked, b"\x02%b\x02\x01" % sentinel, b"\x02%b\x02\x02" % sentinel)),
    ]  # a string length one byte longer than it needs; a boolean written as 2
    for good in (_latest_packet(), _latest_packet(diaSourceId=5)):  # 9- and 1-byte ids
        alert = SCHEMAS[LATEST].deserialize(good)
        cases += [(good, _padded(good, alert["diaSourceId"]))]
        cases += [(good, _two_blocks(good, alert["prvDiaSources"]))]
    for good, bad in cases:
        assert SCHEMAS[LATEST].deserialize(bad) == SCHEMAS[LATEST].deserialize(good)
        for cutouts in (True, False):
            assert formats._transcode(bad, target_id, cutouts=cutouts) is None
            want = formats.convert(good, cutouts=cutouts, schema_id=target_id)
            assert formats.convert(bad, cutouts=cutouts, schema_id=target_id) == want


@pytest.mark.parametrize("target_id", OLDER)
def test_signalling_nan_is_left_to_the_decoder(target_id: int) -> None:
    # Read as a Python float, a signalling NaN float32 comes back quiet: another byte.
    good = _latest_packet(diaSource__raErr=1234.5)
    bad = _replace_once(good, struct.pack("<f", 1234.5), b"\x01\x00\x80\x7f")
    assert formats._transcode(bad, target_id, cutouts=True) is None
    out = formats.convert(bad, schema_id=target_id)
    assert out == slow(bad, target_id, True)
    assert struct.pack("<f", 1234.5) not in out
    assert b"\x01\x00\xc0\x7f" in out


@pytest.mark.parametrize("target_id", OLDER)
def test_corrupt_packets_are_refused_as_before(target_id: int) -> None:
    good = _latest_packet(observation_reason="abcé")
    bad_text = _replace_once(good, "abcé".encode(), b"abc\xff\xfe")
    reason = 5 + len(_varint(SCHEMAS[LATEST].deserialize(good)["diaSourceId"]))
    assert good[reason] == 2  # observation_reason: ["null", "string"], the string
    bad_branch = good[:reason] + b"\x04" + good[reason + 1 :]
    for bad in (good[:-1], good + b"\x00", bad_text, bad_branch, b"\x01" + good[1:]):
        assert formats._transcode(bad, target_id, cutouts=True) is None
        with pytest.raises(AlertPacketError):
            formats.convert(bad, schema_id=target_id)
    with pytest.raises(AlertPacketError, match="not supported"):
        formats.convert(b"\x00\x00\x00\x00\x07" + good[5:], schema_id=target_id)


# -- schema pairs ---------------------------------------------------------------------------------


def _record(name: str, *fields: tuple[str, Any]) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": [{"name": n, "type": t} for n, t in fields]}


def _convert_both_ways(
    source: dict[str, Any], target: dict[str, Any], datum: dict[str, Any]
) -> tuple[bytes | None, bytes]:
    """(the walk's conversion or None if the pair is unsupported, decode-fit-encode's)."""
    s, t = fastavro.parse_schema(source), fastavro.parse_schema(target)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, s, datum)
    raw = buf.getvalue()
    names = (s["__named_schemas"], t["__named_schemas"])
    try:
        steps = transcode._walk_of(transcode._plan(s, t, names, frozenset()))
    except transcode._UnsupportedError:
        fast = None
    else:
        fast = transcode.rewrite(steps, raw, 0, b"")
    value = fastavro.schemaless_reader(io.BytesIO(raw), s, None)
    out = io.BytesIO()
    fastavro.schemaless_writer(out, t, formats._fit(value, t, {}))
    return fast, out.getvalue()


_INNER = _record("inner", ("k", "string"), ("gone", ["null", "long"]), ("v", "float"))
_INNER_FIT = _record("inner", ("k", "string"), ("v", "float"))
_ITEM = _record("item", ("k", "int"), ("gone", "string"), ("flag", "boolean"))
_ITEM_FIT = _record("item", ("k", "long"), ("flag", "boolean"), ("new", ["null", "string"]))


@pytest.mark.parametrize(
    ("source", "target", "datum"),
    [
        pytest.param(
            _record("r", ("a", "int"), ("b", "string")),
            _record("r", ("a", "int"), ("new", ["null", "float"]), ("b", "string")),
            {"a": 3, "b": "x"},
            id="added",
        ),
        pytest.param(
            _record("r", ("a", "long"), ("s", ["null", "string"]), ("i", ["null", _INNER])),
            _record("r", ("a", "long")),
            {"a": -(2**40), "s": "é" * 70, "i": {"k": "q", "gone": 5, "v": 0.5}},
            id="dropped",
        ),
        pytest.param(
            _record("r", ("i", ["null", _INNER]), ("items", {"type": "array", "items": _ITEM})),
            _record(
                "r", ("i", ["null", _INNER_FIT]), ("items", {"type": "array", "items": _ITEM_FIT})
            ),
            {
                "i": {"k": "q", "gone": None, "v": float("nan")},
                "items": [{"k": 2**31 - 1, "gone": "g", "flag": True}] * 3,
            },
            id="nested",
        ),
    ],
)
def test_schema_changes_the_walk_converts(
    source: dict[str, Any], target: dict[str, Any], datum: dict[str, Any]
) -> None:
    fast, want = _convert_both_ways(source, target, datum)
    assert fast is not None
    assert fast == want


@pytest.mark.parametrize(
    ("source", "target"),
    [
        pytest.param(_record("r", ("a", "float")), _record("r", ("a", "double")), id="float"),
        pytest.param(
            _record("r", ("a", "int"), ("b", "int")),
            _record("r", ("b", "int"), ("a", "int")),
            id="reordered",
        ),
        pytest.param(
            _record("r", ("a", "int")),
            {
                "type": "record",
                "name": "r",
                "fields": [
                    {"name": "a", "type": "int"},
                    {"name": "n", "type": ["int", "null"], "default": 1},
                ],
            },
            id="default",
        ),
        pytest.param(
            _record("r", ("a", ["null", "int", "string"])),
            _record("r", ("a", ["null", "int", "string"])),
            id="union",
        ),
        pytest.param(
            _record("r", ("m", {"type": "map", "values": "int"})),
            _record("r", ("m", {"type": "map", "values": "int"})),
            id="map",
        ),
    ],
)
def test_schema_changes_left_to_the_decoder(source: dict[str, Any], target: dict[str, Any]) -> None:
    s, t = fastavro.parse_schema(source), fastavro.parse_schema(target)
    with pytest.raises(transcode._UnsupportedError):
        transcode._plan(s, t, (s["__named_schemas"], t["__named_schemas"]), frozenset())


# -- inspecting a packet (ingest): the compiled walk against fastavro ----------------------------


def _inspect_both(packet: bytes) -> tuple[Any, Any]:
    """(walk's result or error type, fastavro's result or error type)."""
    out = []
    for walk in (True, False):
        try:
            out.append(formats.inspect(packet, walk=walk))
        except AlertPacketError as exc:
            out.append(type(exc))
    return out[0], out[1]


def _same(a: Any, b: Any) -> bool:
    """Equal, field by field for AlertMeta, NaN equal to NaN."""
    if isinstance(a, formats.AlertMeta) and isinstance(b, formats.AlertMeta):
        return all(_same(getattr(a, f), getattr(b, f)) for f in formats.AlertMeta.__slots__)
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return bool(a == b)


@pytest.mark.parametrize("schema_id", sorted(SCHEMAS))
def test_every_supported_diasource_is_walked(schema_id: int) -> None:
    steps = formats._source_steps(schema_id)
    assert steps is not None
    source_schema = formats._source_schema(schema_id)
    for packet in (*packets(schema_id), *packets(schema_id, cutouts=False)):
        walked, read = _inspect_both(packet)
        assert isinstance(walked, formats.AlertMeta)
        assert _same(walked, read)
        # The walk itself reads it (no fallback), the kept fields as fastavro reads them.
        pos = packet.index(_varint(walked.alert_id), 5) + len(_varint(walked.alert_id)) + 2
        fields = formats._walk_source(packet, pos, steps)
        full = fastavro.schemaless_reader(io.BytesIO(packet[pos:]), source_schema, None)
        assert isinstance(full, dict)
        assert fields == {k: full[k] for k in fields}
        assert set(fields) == formats._INDEXED & set(full)


@pytest.mark.parametrize("schema_id", sorted(SCHEMAS))
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_random_diasources_inspect_as_fastavro_reads_them(
    schema_id: int, data: st.DataObject
) -> None:
    """Any DiaSource (every field null or any value, any float incl. NaN and infinities,
    any string) gives the same index fields, or the same refusal, by both readers; so do
    truncated and corrupted copies of its packet."""
    schema = SCHEMAS[schema_id]
    alert = data.draw(_values(schema.parsed, schema.parsed["__named_schemas"]))
    alert["diaSource"]["diaSourceId"] = alert["diaSourceId"]  # (else refused by both)
    packet = schema.serialize(alert)
    walked, read = _inspect_both(packet)
    assert _same(walked, read), (walked, read)
    cut = data.draw(st.integers(5, len(packet) - 1))
    assert _same(*_inspect_both(packet[:cut]))
    at = data.draw(st.integers(5, min(len(packet) - 1, 600)))
    flipped = packet[:at] + bytes([packet[at] ^ data.draw(st.integers(1, 255))]) + packet[at + 1 :]
    walked, read = _inspect_both(flipped)
    assert _same(walked, read), (at, walked, read)


def test_walk_leaves_unusual_diasources_to_fastavro(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept field with a logical type, or a field of a type the walk does not read, makes
    the whole schema fastavro's; a skipped logical type is read as its primitive."""

    def schema(*fields: dict[str, Any]) -> dict[str, Any]:
        return {"type": "record", "name": "DiaSource", "fields": list(fields)}

    skipped_logical = {"name": "t", "type": {"type": "long", "logicalType": "timestamp-micros"}}
    kept_logical = {"name": "visit", "type": {"type": "long", "logicalType": "timestamp-micros"}}
    array = {"name": "a", "type": {"type": "array", "items": "long"}}
    three_way = {"name": "u", "type": ["null", "long", "string"]}
    steps = formats._source_steps.__wrapped__  # uncached
    for fields, walked in (
        ([{"name": "visit", "type": "long"}, skipped_logical], True),
        ([kept_logical], False),
        ([array], False),
        ([three_way], False),
    ):
        monkeypatch.setattr(formats, "_source_schema", lambda _id, f=fields: schema(*f))
        assert (steps(0) is not None) is walked, fields


@pytest.mark.parametrize("chunk_bytes", [1, 5, 100, 1 << 20])
def test_ingest_body_streamed_in_pieces_is_the_packed_body(chunk_bytes: int) -> None:
    """The pieces `AlertClient.ingest` streams join to `pack_packets`' body, whose length it
    announces, and unpack to the packets."""
    packets = [b"", b"a", b"bc" * 40, bytes(range(256)) * 3]
    pieces = list(formats.iter_packed(packets, chunk_bytes))
    body = formats.pack_packets(packets)
    assert b"".join(pieces) == body
    assert formats.packed_size(packets) == len(body) == 4 * 4 + 1 + 80 + 768
    assert formats.unpack_packets(body) == packets
    assert all(len(p) < chunk_bytes + 4 + 768 for p in pieces)  # about chunk_bytes each
    assert list(formats.iter_packed([])) == []
