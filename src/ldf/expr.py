"""A small, safe expression language over records (file metadata, alert fields).

Used by Data Backbone replication rules (``instrument == 'LSSTCam' and day_obs >= 20261101``)
and, later, by the mini-broker's user filters (``diaSource.snr > 10 and band in ('g','r')``).
Expressions are parsed by a lark grammar and compiled to a tree of closures: never ``eval``.
An error points at the offending token.

Grammar (keywords lower case)::

    expr       := or
    or         := and ('or' and)*
    and        := not ('and' not)*
    not        := 'not' not | test
    test       := value OP value            OP in == != < <= > >=
                | value ['not'] 'in' '(' value (',' value)* ')'
                | value ['not'] 'like' STRING      glob: * any run, ? one character
                | value 'is' ['not'] 'null'
                | '(' expr ')'
                | value                            truthiness of a field
    value      := NAME ('.' NAME)* | STRING | NUMBER | 'true' | 'false' | 'null'

Semantics follow SQL's for missing values: a comparison with a missing field or ``null`` is
false (``is null`` tests for it). Comparing values of incompatible types is false.
"""

from __future__ import annotations

import fnmatch
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from ldf.errors import UserInputError

__all__ = ["Expression", "parse"]

_KEYWORDS = "and|or|not|in|like|is|null|true|false"
_NAME = r"[A-Za-z_][A-Za-z0-9_]*"

_GRAMMAR = r"""
?start: or_
?or_: and_ ("or" and_)*
?and_: not_ ("and" not_)*
?not_: "not" not_ -> negate
     | test
?test: value COMPARE value            -> compare
     | value "in" "(" value ("," value)* ")"        -> within
     | value "not" "in" "(" value ("," value)* ")"  -> not_within
     | value "like" STRING            -> like
     | value "not" "like" STRING      -> not_like
     | value "is" "null"              -> is_null
     | value "is" "not" "null"        -> is_not_null
     | "(" or_ ")"
     | value                          -> truthy
?value: FIELD                         -> field
      | STRING                        -> string
      | NUMBER                        -> number
      | "true"                        -> true
      | "false"                       -> false
      | "null"                        -> null
COMPARE: "==" | "!=" | "<=" | ">=" | "<" | ">"
FIELD: /(?!(KEYWORDS)\b)NAME(\.NAME)*/
STRING: /'[^']*'/ | /"[^"]*"/
NUMBER: /-?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?/
%import common.WS
%ignore WS
"""

_PARSER = Lark(
    _GRAMMAR.replace("KEYWORDS", _KEYWORDS).replace("NAME", _NAME),
    parser="lalr",
    propagate_positions=True,
)

_MISSING = object()

Record = Mapping[str, Any]
Getter = Callable[[Record], Any]
Predicate = Callable[[Record], bool]

_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}


def _lookup(record: Record, path: tuple[str, ...]) -> Any:
    value: Any = record
    for part in path:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        else:
            return _MISSING
    return value


def _comparable(a: Any, b: Any) -> bool:
    if a is _MISSING or b is _MISSING or a is None or b is None:
        return False
    numeric = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    return (isinstance(a, numeric) and isinstance(b, numeric)) or type(a) is type(b)


@v_args(inline=True)
class _Compiler(Transformer[Token, Any]):
    """Turns the parse tree into closures (getters for values, predicates for tests)."""

    def __init__(self, text: str, fields: frozenset[str] | None) -> None:
        super().__init__()
        self.text = text
        self.fields = fields
        self.names: set[str] = set()

    # values -----------------------------------------------------------------------------
    def field(self, tok: Token) -> Getter:
        name = str(tok)
        if self.fields is not None and name not in self.fields:
            hint = _suggest(name, self.fields)
            raise _error(self.text, tok.column or 1, f"unknown field {name!r}", hint)
        self.names.add(name)
        path = tuple(name.split("."))
        return lambda r: _lookup(r, path)

    def string(self, tok: Token) -> Getter:
        value = str(tok)[1:-1]
        return lambda r: value

    def number(self, tok: Token) -> Getter:
        text = str(tok)
        value: int | float = float(text) if any(c in text for c in ".eE") else int(text)
        return lambda r: value

    def true(self) -> Getter:
        return lambda r: True

    def false(self) -> Getter:
        return lambda r: False

    def null(self) -> Getter:
        return lambda r: None

    # tests ------------------------------------------------------------------------------
    def compare(self, left: Getter, op: Token, right: Getter) -> Predicate:
        fn = _COMPARE[str(op)]

        def test(r: Record) -> bool:
            a, b = left(r), right(r)
            return _comparable(a, b) and bool(fn(a, b))

        return test

    def within(self, left: Getter, *options: Getter) -> Predicate:
        return lambda r: any(_comparable(a := left(r), b := o(r)) and a == b for o in options)

    def not_within(self, left: Getter, *options: Getter) -> Predicate:
        inside = self.within(left, *options)
        return lambda r: left(r) not in (_MISSING, None) and not inside(r)

    def like(self, left: Getter, pattern: Token) -> Predicate:
        glob = str(pattern)[1:-1]

        def test(r: Record) -> bool:
            v = left(r)
            return isinstance(v, str) and fnmatch.fnmatchcase(v, glob)

        return test

    def not_like(self, left: Getter, pattern: Token) -> Predicate:
        inner = self.like(left, pattern)
        return lambda r: isinstance(left(r), str) and not inner(r)

    def is_null(self, left: Getter) -> Predicate:
        return lambda r: left(r) in (_MISSING, None)

    def is_not_null(self, left: Getter) -> Predicate:
        return lambda r: left(r) not in (_MISSING, None)

    def truthy(self, value: Getter) -> Predicate:
        return lambda r: (v := value(r)) is not _MISSING and bool(v)

    def negate(self, inner: Predicate) -> Predicate:
        return lambda r: not inner(r)

    def and_(self, *parts: Predicate) -> Predicate:
        return lambda r: all(p(r) for p in parts)

    def or_(self, *parts: Predicate) -> Predicate:
        return lambda r: any(p(r) for p in parts)


class _LocatedError(Exception):
    def __init__(self, column: int, message: str) -> None:
        self.column = column
        self.message = message


def _suggest(name: str, fields: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _error(text: str, column: int, message: str, hint: str = "") -> _LocatedError:
    return _LocatedError(column, f"{message}{hint}")


def _report(text: str, column: int, message: str) -> UserInputError:
    caret = " " * max(column - 1, 0) + "^"
    return UserInputError(f"bad expression at column {column}: {message}\n  {text}\n  {caret}")


@dataclass(frozen=True)
class Expression:
    """A parsed expression: call `matches` on records."""

    text: str
    """The expression as written."""
    fields: frozenset[str]
    """Field names it reads."""
    _test: Predicate

    def matches(self, record: Record) -> bool:
        """Whether the record satisfies the expression."""
        return self._test(record)

    def filter(self, records: Iterable[Record]) -> list[Record]:
        """The records that satisfy the expression."""
        return [r for r in records if self._test(r)]


@lru_cache(maxsize=512)
def _parse_cached(text: str, fields: frozenset[str] | None) -> Expression:
    if not text.strip():
        raise UserInputError("empty expression")
    try:
        tree = _PARSER.parse(text)
    except UnexpectedEOF:
        raise _report(text, len(text) + 1, "unexpected end of expression") from None
    except UnexpectedCharacters as exc:
        char = text[exc.pos_in_stream or 0]
        raise _report(text, exc.column, f"unexpected character {char!r}") from None
    except UnexpectedToken as exc:
        tok = exc.token
        if tok.type == "$END":
            raise _report(text, len(text) + 1, "unexpected end of expression") from None
        raise _report(text, tok.column or 1, f"unexpected {str(tok)!r}") from None
    except UnexpectedInput as exc:  # pragma: no cover - other lark errors
        raise _report(text, getattr(exc, "column", 1) or 1, "cannot parse") from None
    compiler = _Compiler(text, fields)
    try:
        test = compiler.transform(tree)
    except Exception as exc:  # lark wraps errors raised in callbacks
        inner = getattr(exc, "orig_exc", exc)
        if isinstance(inner, _LocatedError):
            raise _report(text, inner.column, inner.message) from None
        raise
    if not callable(test):  # pragma: no cover - grammar guarantees a predicate
        raise UserInputError(f"not a condition: {text}")
    return Expression(text=text, fields=frozenset(compiler.names), _test=test)


def parse(text: str, *, fields: Iterable[str] | None = None) -> Expression:
    """Parse an expression.

    Parameters
    ----------
    text
        The expression.
    fields
        Allowed field names (dotted); None allows any.

    Raises
    ------
    UserInputError
        The expression does not parse, or names an unknown field; the message shows the
        expression with a caret under the offending token.
    """
    return _parse_cached(text, frozenset(fields) if fields is not None else None)
