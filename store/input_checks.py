"""What every entry point checks in a producer's JSON before the ledger keeps it, and how input is
echoed back in error messages.

One parser for batch lines and for the bodies of ``POST /v1/chat/completions`` and
``/v1/agent_runs``: :func:`parse_json` refuses, with a named code, what PostgreSQL cannot store or
a worker could not serialise or walk later (each of these was accepted once, then failed every
delivery of the request):

- ``invalid_json``: not JSON, or not UTF-8 (raw surrogate bytes included);
- ``non_finite_number``: ``NaN``, ``Infinity``, ``-Infinity``, or a number too large for a
  double (``1e999``): JSON has no such values and PostgreSQL's json refuses them;
- ``nesting_too_deep``: objects / arrays nested more than :data:`MAX_JSON_DEPTH` levels;
- ``lone_surrogate``: a ``\\ud800``-style escape that is not half of a pair (not a character:
  it cannot be encoded as UTF-8);
- ``nul_character``: ``\\u0000`` in any string or key (PostgreSQL text cannot hold it).

:func:`quote_input` bounds every echo of input in an error message.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "MAX_ECHO_CHARS",
    "MAX_JSON_DEPTH",
    "JSONRejected",
    "bounded_text",
    "check_json_value",
    "parse_json",
    "quote_input",
]

MAX_JSON_DEPTH = 64
MAX_ECHO_CHARS = 200

_UNSAFE_CHARACTER = re.compile("[\x00\ud800-\udfff]")


class JSONRejected(ValueError):
    """Input refused by :func:`parse_json` / :func:`check_json_value`; ``param`` is the path of the
    offending value (``body.messages[0].content``) when there is one."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def quote_input(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was: an error message must
    not grow with the input it names. (``repr`` also escapes NUL and lone surrogates.)"""
    text = repr(value[: limit + 1] if isinstance(value, str) else value)
    if isinstance(value, str) and len(value) > limit:
        return f"{text[:limit]}... ({len(value)} characters)"
    return text if len(text) <= limit else f"{text[:limit]}..."


def bounded_text(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` made safe to store and send back (NUL and lone surrogates replaced) and cut to
    ``limit`` characters."""
    text = _UNSAFE_CHARACTER.sub("\ufffd", text[: limit + 1])
    return text if len(text) <= limit else text[:limit] + "..."


class _NonFinite:
    """Stands for a non-finite number while parsing, so that the check can name its path."""

    def __repr__(self) -> str:
        return "<non-finite number>"


_NON_FINITE = _NonFinite()


def parse_json(data: bytes | str, *, prefix: str = "") -> Any:
    """The JSON value in ``data``; raises :class:`JSONRejected` (codes above). ``prefix`` starts
    the ``param`` path of a refused value (e.g. ``"body."``)."""
    try:
        text = data.decode("utf-8-sig") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise JSONRejected("invalid_json", f"not valid UTF-8: {e}") from e
    odd_numbers = False

    def constant(_: str) -> _NonFinite:
        nonlocal odd_numbers
        odd_numbers = True
        return _NON_FINITE

    def number(literal: str) -> float | _NonFinite:
        value = float(literal)
        if math.isfinite(value):
            return value
        return constant(literal)

    try:
        value = json.loads(text, parse_constant=constant, parse_float=number)
    except RecursionError as e:
        raise JSONRejected("nesting_too_deep", _TOO_DEEP) from e
    except ValueError as e:
        raise JSONRejected("invalid_json", f"not valid JSON: {e}") from e
    # Measured only once the text is known to be JSON: on unclosed strings the string pattern
    # retries from every quote (quadratic: an 80 KB body took 22 s).
    too_deep = text.count("[") + text.count("{") > MAX_JSON_DEPTH and _nests_too_deep(text)
    code = _refusal(text, value, odd_numbers, too_deep)
    if code is not None:
        # Only now walk the value, to name the path of what is refused.
        raise _find_problem(value, prefix, budget=_WALK_BUDGET) or JSONRejected(code, _MESSAGES[code])
    return value


def check_json_value(value: Any, *, prefix: str = "") -> None:
    """Raise :class:`JSONRejected` if ``value`` (a value about to be stored as JSON) holds a
    non-finite number, a NUL or a lone surrogate in a string or key, or nests deeper than
    :data:`MAX_JSON_DEPTH`."""
    problem = _find_problem(value, prefix, budget=None)
    if problem is not None:
        raise problem


_TOO_DEEP = f"JSON is nested more than {MAX_JSON_DEPTH} levels deep"
_NON_FINITE_MESSAGE = "NaN, Infinity and numbers beyond a double's range are not JSON numbers"
# Values visited to name the path of a refused value; past it the refusal has no param.
_WALK_BUDGET = 100_000
# In valid JSON a backslash only starts an escape inside a string: an escape is a backslash
# preceded by an even number of backslashes.
_REAL_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Outside its strings, JSON text is ASCII: brackets, and these (NaN and Infinity need no
# deleting: the parser refuses them anyway).
_NOT_BRACKETS = b" \t\n\r,:0123456789+-.eEtruefalsn"
_OBJECTS_AS_ARRAYS = bytes.maketrans(b"{}", b"[]")


def _nests_too_deep(text: str) -> bool:
    """Whether JSON ``text`` nests more than MAX_JSON_DEPTH levels: its brackets outside strings,
    ``{}`` turned into ``[]``, lose one level a pass (``replace`` removes the innermost pairs).
    ``text`` must be valid JSON: then every string closes and ``_STRING`` matches each at once."""
    outside_strings = _STRING.sub("", text).encode("ascii", "replace")
    brackets = outside_strings.translate(_OBJECTS_AS_ARRAYS, _NOT_BRACKETS)
    for _ in range(MAX_JSON_DEPTH):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


def _has_lone_surrogate(value: Any) -> bool:
    # json.loads joins escaped pairs into one character: a surrogate left in a string is lone.
    dumped = json.dumps(value, ensure_ascii=False, check_circular=False)
    return _SURROGATE.search(dumped) is not None


def _refusal(text: str, value: Any, odd_numbers: bool, too_deep: bool) -> str | None:
    """The code to refuse the parsed ``text`` with, or None. Each check runs over the text at C
    speed: walking the value in Python took a second for a 1 MB line of empty arrays."""
    if odd_numbers:
        return "non_finite_number"
    if too_deep:
        return "nesting_too_deep"
    if _REAL_NUL_ESCAPE.search(text) is not None:
        return "nul_character"
    if _SURROGATE_ESCAPE.search(text) is not None and _has_lone_surrogate(value):
        return "lone_surrogate"
    return None


_NUL_MESSAGE = "strings must not contain a NUL character (\\u0000)"
_MESSAGES = {
    "non_finite_number": _NON_FINITE_MESSAGE,
    "nesting_too_deep": _TOO_DEEP,
    "nul_character": _NUL_MESSAGE,
    "lone_surrogate": "strings must not contain a lone surrogate (half of a pair)",
}
_SURROGATE = re.compile("[\ud800-\udfff]")


def _scalar_problem(value: Any) -> tuple[str, str] | None:
    if isinstance(value, str):
        found = _UNSAFE_CHARACTER.search(value)
        if found is None:
            return None
        if found.group() == "\x00":
            return "nul_character", _NUL_MESSAGE
        return (
            "lone_surrogate",
            f"strings must not contain a lone surrogate (\\u{ord(found.group()):04x} without its pair)",
        )
    if value is _NON_FINITE:
        return "non_finite_number", _NON_FINITE_MESSAGE
    if isinstance(value, float) and not math.isfinite(value):
        return "non_finite_number", f"{value} is not a JSON number"
    return None


def _children(value: Any) -> Iterator[tuple[str | int, Any]] | None:
    if isinstance(value, Mapping):
        return iter(value.items())
    if isinstance(value, list | tuple):
        return enumerate(value)
    return None


def _find_problem(value: Any, prefix: str, budget: int | None) -> JSONRejected | None:
    """The first value refused, with its path; None when all is well (or ``budget`` values were
    visited first). Holds one iterator a level, so any width and depth are safe to walk."""
    problem = _scalar_problem(value)
    if problem is not None:
        return JSONRejected(*problem, _path(prefix, []))
    root = _children(value)
    if root is None:
        return None
    stack = [root]
    keys: list[str | int] = []  # keys[i]: the key, in stack[i]'s container, of stack[i + 1]'s
    visited = 0
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
            if keys:
                keys.pop()
            continue
        key, child = step
        visited += 1
        if budget is not None and visited > budget:
            return None
        if isinstance(key, str) and (problem := _scalar_problem(key)) is not None:
            return JSONRejected(*problem, _path(prefix, keys))
        if (problem := _scalar_problem(child)) is not None:
            return JSONRejected(*problem, _path(prefix, [*keys, key]))
        children = _children(child)
        if children is not None:
            if len(stack) >= MAX_JSON_DEPTH:
                return JSONRejected("nesting_too_deep", _TOO_DEEP, _path(prefix, [*keys, key]))
            stack.append(children)
            keys.append(key)
    return None


def _path(prefix: str, keys: list[str | int]) -> str | None:
    path = prefix.rstrip(".")
    for key in keys:
        path += f"[{key}]" if isinstance(key, int) else (f".{key}" if path else key)
    return bounded_text(path) if path else None
