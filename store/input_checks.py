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
from collections.abc import Mapping
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
        raise JSONRejected(
            "nesting_too_deep", f"JSON is nested more than {MAX_JSON_DEPTH} levels deep"
        ) from e
    except ValueError as e:
        raise JSONRejected("invalid_json", f"not valid JSON: {e}") from e
    # Walking every value costs; it is only needed when one of the checks could fail: escapes
    # (\u0000, lone surrogates; raw control characters and raw surrogates were refused above),
    # enough brackets for too deep a nesting, or a non-finite number seen by the parser.
    if odd_numbers or "\\u" in text or text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        check_json_value(value, prefix=prefix)
    return value


# (value, depth, parent entry, key in parent): the path is rebuilt only for a refusal.
_Entry = tuple[Any, int, Any, str | int | None]


def check_json_value(value: Any, *, prefix: str = "") -> None:
    """Raise :class:`JSONRejected` if ``value`` (parsed JSON, or a value about to be stored as
    JSON) holds a non-finite number, a NUL or a lone surrogate in a string or key, or nests deeper
    than :data:`MAX_JSON_DEPTH`. Walks without recursion, so any depth is safe to check."""
    stack: list[_Entry] = [(value, 0, None, None)]
    while stack:
        entry = stack.pop()
        node, depth, _, _ = entry
        if isinstance(node, str):
            _check_string(node, entry, prefix)
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise JSONRejected("non_finite_number", f"{node} is not a JSON number", _path(entry, prefix))
        elif node is _NON_FINITE:
            raise JSONRejected(
                "non_finite_number",
                "NaN, Infinity and numbers beyond a double's range are not JSON numbers",
                _path(entry, prefix),
            )
        elif isinstance(node, Mapping | list):
            if depth >= MAX_JSON_DEPTH:
                raise JSONRejected(
                    "nesting_too_deep",
                    f"JSON is nested more than {MAX_JSON_DEPTH} levels deep",
                    _path(entry, prefix),
                )
            items = list(node.items()) if isinstance(node, Mapping) else list(enumerate(node))
            for key, child in reversed(items):  # reversed: the first bad value is found first
                if isinstance(key, str):
                    _check_string(key, (key, depth + 1, entry, None), prefix)
                stack.append((child, depth + 1, entry, key))


def _check_string(text: str, entry: _Entry, prefix: str) -> None:
    found = _UNSAFE_CHARACTER.search(text)
    if found is None:
        return
    if found.group() == "\x00":
        raise JSONRejected(
            "nul_character", "strings must not contain a NUL character (\\u0000)", _path(entry, prefix)
        )
    raise JSONRejected(
        "lone_surrogate",
        f"strings must not contain a lone surrogate (\\u{ord(found.group()):04x} without its pair)",
        _path(entry, prefix),
    )


def _path(entry: _Entry, prefix: str) -> str | None:
    keys: list[str | int] = []
    current: _Entry | None = entry
    while current is not None:
        _, _, parent, key = current
        if key is not None:
            keys.append(key)
        current = parent
    path = prefix.rstrip(".")
    for key in reversed(keys):
        path += f"[{key}]" if isinstance(key, int) else (f".{key}" if path else key)
    return bounded_text(path) if path else None
