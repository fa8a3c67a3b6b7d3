"""Conversion of an alert packet to another minor version of its schema without decoding it.

Used by :func:`ldf.alerts.formats.convert`; see the comment below for why it is hand-written
and what it measured.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from typing import Any

import fastavro

from ldf.pipelines.alertpacket import AlertPacketError

__all__ = ["compile_walk", "rewrite"]


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """An Avro long (zigzag varint) at ``pos``: (value, next position)."""
    shift = result = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise AlertPacketError("corrupt alert body: varint too long")


# -- converting between schema versions without decoding -----------------------------------------
# Converting an 80 KB packet by decoding it, fitting the record (_fit) and encoding it again
# costs 2.3-3.9 ms, and not because of the cutouts: decoding and encoding the ~2 KB before them
# (an alert holds ~1,200 fields: its DiaSource, its history of DiaSources, its DiaObject) costs
# nearly all of it (measured: 1.1 ms + 2.4 ms of 3.6 ms), so decoding only that part saves
# nothing. fastavro cannot project a datum from one schema to another without building its
# Python objects, hence this hand-written walk: the schema pair is compiled once into a walk
# over the encoded bytes that finds the values the conversion drops or adds (fields one version
# lacks, the nulled cutouts), and the packet is copied around them. Runs of fields of fixed or
# varint width are matched by one regular expression each (in C); only strings, arrays and
# unions holding those are walked in Python. The walk accepts only the canonical encoding
# fastavro writes (one block per array, shortest varints, booleans 0/1, no signalling-NaN
# floats, valid UTF-8, logical values that survive a round trip), so what it copies would decode
# and re-encode to the same bytes and its result is the slow path's byte for byte; anything else
# is left to the slow path. Measured (timeit, 16 packets of synthetic.make_packets, 80 KB, 2-core
# machine shared with other work): 11.1 -> 11.0 in 75-113 us per packet with cutouts and 75-78 us
# without, against 2.3-3.6 ms and 2.1-3.9 ms decoding (30x); 11.0 -> 11.1 in ~0.1 ms.

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_VARINT = r"(?:[\x00-\x7f]|[\x80-\xff]{1,8}[\x01-\x7f]|[\x80-\xff]{9}\x01)"
"""A canonical (shortest) Avro varint: a 64-bit value in at most ten bytes."""
_FLOAT = r"(?!(?:..[\x81-\xbf]|(?:[\x01-\xff].|\x00[\x01-\xff])\x80)[\x7f\xff]).{4}"
"""A float32 that is not a signalling NaN (reading it as a Python float would quiet it)."""
_PATTERNS = {"null": "", "boolean": r"[\x00\x01]", "int": _VARINT, "long": _VARINT,
             "float": _FLOAT, "double": ".{8}"}  # fmt: skip
"""Regular expressions of the canonical encoding of fixed- and varint-width types."""

# Steps of a compiled walk (tuples, first item the kind; ``repl`` last: None to copy the value,
# else the bytes that replace it in the result):
_RX = 0  # (_RX, pattern, ((group, repl), ...)): one match; each group is a value to replace
_STR = 1  # (_STR, nullable, utf8, repl): string or bytes, or ["null", string or bytes]
_UNION = 2  # (_UNION, (walk or None per branch), repl)
_ARRAY = 3  # (_ARRAY, walk of one item, repl)
_LOGICAL = 4  # (_LOGICAL, parsed schema, repl): an int or long with a logical type
_SPAN = 5  # (_SPAN, walk, repl): a value of several steps, replaced as a whole


class _UnsupportedError(Exception):
    """A schema pair the walk cannot convert (the slow path does)."""


class _MismatchError(Exception):
    """A packet the walk refuses: corrupt, or not as fastavro would write it."""


@dataclass(frozen=True, slots=True)
class _Rx:
    """A regular expression under construction and what to put in place of each of its
    groups (one per group, in the order the groups open)."""

    text: str
    repls: tuple[bytes, ...] = ()


_Item = _Rx | tuple[Any, ...]


def _merge(items: list[_Item]) -> list[_Item]:
    """Adjacent regular expressions joined into one."""
    out: list[_Item] = []
    for item in items:
        if isinstance(item, _Rx) and out and isinstance(out[-1], _Rx):
            out[-1] = _Rx(out[-1].text + item.text, out[-1].repls + item.repls)
        else:
            out.append(item)
    return out


def _walk_of(items: list[_Item]) -> tuple[tuple[Any, ...], ...]:
    """A walk's steps: each regular expression compiled, with its group numbers."""
    steps: list[tuple[Any, ...]] = []
    for item in _merge(items):
        if isinstance(item, _Rx):
            if item.text:
                pattern = re.compile(item.text.encode("ascii"), re.DOTALL)
                steps.append((_RX, pattern, tuple(enumerate(item.repls, 1))))
        else:
            steps.append(item)
    return tuple(steps)


def _tag(index: int) -> str:
    """The pattern of a union's branch index (below 64: one byte)."""
    return f"\\x{2 * index:02x}"


def _replaced(items: list[_Item], repl: bytes) -> list[_Item]:
    """A value (walked by ``items``, which replace nothing) replaced by ``repl``."""
    merged = _merge(items)
    if not merged:
        return [_Rx("()", (repl,))]
    if len(merged) == 1:
        only = merged[0]
        if isinstance(only, _Rx):
            return [_Rx(f"({only.text})", (repl,))]
        return [(*only[:-1], repl)]
    return [(_SPAN, _walk_of(merged), repl)]


def _null(avro_type: Any, named: dict[str, Any]) -> bytes:
    """How fastavro writes None as ``avro_type``."""
    if isinstance(avro_type, str) and avro_type in named:
        avro_type = named[avro_type]
    if avro_type == "null":
        return b""
    if isinstance(avro_type, list) and "null" in avro_type and len(avro_type) <= 63:
        return bytes([2 * avro_type.index("null")])
    raise _UnsupportedError(f"None is not a {avro_type}")


def _resolve(avro_type: Any, named: dict[str, Any]) -> Any:
    """A parsed type with its name looked up, or a primitive's name."""
    if isinstance(avro_type, str):
        if avro_type in _PRIMITIVES:
            return avro_type
        if avro_type in named:
            return named[avro_type]
        raise _UnsupportedError(f"unknown type {avro_type}")
    if (
        isinstance(avro_type, dict)
        and avro_type.get("type") in _PRIMITIVES
        and "logicalType" not in avro_type
    ):
        return avro_type["type"]
    return avro_type


def _plan(
    source: Any,
    target: Any,
    names: tuple[dict[str, Any], dict[str, Any]],
    seen: frozenset[tuple[str, str]],
    nulled: tuple[str, ...] = (),
) -> list[_Item]:
    """The walk of a ``source`` value that gives what ``_fit`` to ``target`` and fastavro's
    writer make of it.

    Raises
    ------
    _UnsupportedError
        A pair of types the walk does not convert (map, enum, fixed, a union or record whose
        shape changed, a type change other than int to long...).
    """
    s, t = _resolve(source, names[0]), _resolve(target, names[1])
    if isinstance(s, str) or isinstance(t, str):
        if not (isinstance(s, str) and isinstance(t, str)) or (
            s != t and (s, t) != ("int", "long")
        ):
            raise _UnsupportedError(f"{s} to {t}")
        if s in ("string", "bytes"):
            return [(_STR, False, s == "string", None)]
        return [_Rx(_PATTERNS[s])]
    if isinstance(s, list) or isinstance(t, list):
        # _fit keeps a union's branch only if it has one non-null branch: then the branch
        # index the writer picks is the source's.
        if not (isinstance(s, list) and isinstance(t, list)) or len(s) != len(t) or len(t) > 63:
            raise _UnsupportedError("union to another shape")
        if sum(b != "null" for b in t) > 1:
            raise _UnsupportedError("union of several types")
        branches: list[list[_Item] | None] = []
        for bs, bt in zip(s, t, strict=True):
            if "null" in (bs, bt):
                if bs != bt:
                    raise _UnsupportedError("union to another shape")
                branches.append(None)
            else:
                branches.append(_merge(_plan(bs, bt, names, seen)))
        if all(b is None or all(isinstance(i, _Rx) for i in b) for b in branches):
            alternatives: list[str] = []
            repls: tuple[bytes, ...] = ()
            for i, b in enumerate(branches):
                rx = b[0] if b else None
                assert rx is None or isinstance(rx, _Rx)
                alternatives.append(_tag(i) + (f"(?:{rx.text})" if rx else ""))
                repls += rx.repls if rx else ()
            return [_Rx(f"(?:{'|'.join(alternatives)})", repls)]
        if len(branches) == 2 and branches[0] is None:  # ["null", string]: one step
            only = branches[1]
            if only and len(only) == 1 and isinstance(only[0], tuple) and only[0][0] == _STR:
                return [(_STR, True, only[0][2], None)]
        walks = tuple(None if b is None else _walk_of(b) for b in branches)
        return [(_UNION, walks, None)]
    kind = s.get("type")
    if kind != t.get("type"):
        raise _UnsupportedError(f"{kind} to {t.get('type')}")
    if kind == "array":
        return [(_ARRAY, _walk_of(_plan(s["items"], t["items"], names, seen)), None)]
    if kind in ("int", "long") and s == t:  # a logical type: _LOGICAL checks the round trip
        return [(_LOGICAL, fastavro.parse_schema(dict(s)), None)]
    if kind != "record":
        raise _UnsupportedError(f"{kind}")
    key = (s["name"], t["name"])
    if key in seen:
        raise _UnsupportedError("recursive record")
    seen = seen | {key}
    target_fields = [f["name"] for f in t["fields"]]
    source_fields = [f["name"] for f in s["fields"]]
    common = [n for n in source_fields if n in target_fields]
    if common != [n for n in target_fields if n in source_fields]:
        raise _UnsupportedError("fields in another order")
    items: list[_Item] = []

    def target_only(field: dict[str, Any]) -> None:
        # _fit gives it None; fastavro would write its default where _fit does not reach.
        if field["name"] not in nulled and field.get("default") is not None:
            raise _UnsupportedError("a new field with a default")
        items.append(_Rx("()", (_null(field["type"], names[1]),)))

    own = (names[0], names[0])  # a dropped or nulled value is walked in its own schema
    pending = iter(t["fields"])
    for field in s["fields"]:
        name = field["name"]
        if name not in target_fields:
            items += _replaced(_plan(field["type"], field["type"], own, seen), b"")
            continue
        tf = next(pending)
        while tf["name"] != name:
            target_only(tf)
            tf = next(pending)
        if name in nulled:
            null = _null(tf["type"], names[1])
            items += _replaced(_plan(field["type"], field["type"], own, seen), null)
        else:
            items += _plan(field["type"], tf["type"], names, seen)
    for tf in pending:
        target_only(tf)
    return items


def _long(buf: bytes, pos: int) -> tuple[int, int]:
    """A canonical Avro long at ``pos``: (value, next position)."""
    b = buf[pos]
    if b < 0x80:  # one byte: most lengths, counts and branch indices
        return (b >> 1) ^ -(b & 1), pos + 1
    value, end = _varint(buf, pos)
    if buf[end - 1] == 0 or end - pos > 10 or (end - pos == 10 and buf[end - 1] != 1):
        raise _MismatchError("not a canonical varint")
    return value, end


def _walk(steps: tuple[tuple[Any, ...], ...], buf: bytes, pos: int, out: list[Any]) -> int:
    """Walk one value from ``pos``; append (start, end, replacement) of what to replace to
    ``out``; return where the value ends.

    Raises
    ------
    _MismatchError, IndexError, ValueError...
        Not the canonical encoding of a value of the schema.
    """
    for step in steps:
        kind, start = step[0], pos
        if kind == _RX:
            m = step[1].match(buf, pos)
            if m is None:
                raise _MismatchError("no match")
            for group, value in step[2]:
                a = m.start(group)
                if a >= 0:
                    out.append((a, m.end(group), value))
            pos = m.end()
            continue
        if kind == _STR:
            null = False
            if step[1]:
                tag = buf[pos]
                pos += 1
                null = tag == 0
                if tag > 2 or tag == 1:
                    raise _MismatchError("union branch")
            if not null:
                n, pos = _long(buf, pos)
                if n < 0 or pos + n > len(buf):
                    raise _MismatchError("string length")
                if step[2]:
                    str(buf[pos : pos + n], "utf-8")  # raises as fastavro's reader would
                pos += n
        elif kind == _UNION:
            tag = buf[pos]
            pos += 1
            if tag & 1 or tag >= 2 * len(step[1]):
                raise _MismatchError("union branch")
            branch = step[1][tag >> 1]
            if branch is not None:
                pos = _walk(branch, buf, pos, out)
        elif kind == _ARRAY:
            n, pos = _long(buf, pos)
            if n < 0 or n > len(buf):  # a block with its size: fastavro writes none
                raise _MismatchError("array block")
            if n:
                for _ in range(n):
                    pos = _walk(step[1], buf, pos, out)
                if buf[pos] != 0:  # a second block: fastavro writes one
                    raise _MismatchError("array block")
                pos += 1
        elif kind == _LOGICAL:
            _value, pos = _long(buf, pos)
            raw = bytes(buf[start:pos])
            value = fastavro.schemaless_reader(io.BytesIO(raw), step[1], None)
            again = io.BytesIO()
            fastavro.schemaless_writer(again, step[1], value)
            if again.getvalue() != raw:
                raise _MismatchError("logical value does not survive decoding")
        else:  # _SPAN
            pos = _walk(step[1], buf, pos, out)
        if step[-1] is not None:
            out.append((start, pos, step[-1]))
    return pos


def rewrite(steps: tuple[tuple[Any, ...], ...], buf: bytes, pos: int, head: bytes) -> bytes | None:
    """``head`` and the value at ``pos`` (the last in ``buf``) converted by a compiled walk, or
    None if the walk refuses it."""
    replace: list[tuple[int, int, bytes]] = []
    try:
        end = _walk(steps, buf, pos, replace)
    except (_MismatchError, AlertPacketError, LookupError, ValueError, ArithmeticError, EOFError):
        return None
    if end != len(buf):
        return None
    view = memoryview(buf)
    parts: list[Any] = [head]
    for a, b, repl in replace:
        parts += (view[pos:a], repl)
        pos = b
    parts.append(view[pos:])
    return b"".join(parts)


def compile_walk(
    source: dict[str, Any], target: dict[str, Any], drop: tuple[str, ...]
) -> tuple[tuple[Any, ...], ...] | None:
    """The walk converting values of the parsed ``source`` schema to ``target``, with the
    top-level fields ``drop`` (nullable) written as null; None if the pair needs a decode."""
    names = (source["__named_schemas"], target["__named_schemas"])
    try:
        return _walk_of(_plan(source, target, names, frozenset(), drop))
    except _UnsupportedError:
        return None
