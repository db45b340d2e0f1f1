"""Parsing the ``[[...]]`` directives of the last user message (the convention: the package docstring)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from simulator.errors import ApiError

__all__ = ["Directives", "ToolCallDirective", "parse_directives"]

_OPENING = re.compile(r"\[\[\s*([a-z_]+)\b")
_NAME = re.compile(r"\s*([A-Za-z0-9_.\-]+)")
_KEYWORDS = frozenset(
    {
        "call",
        "then",
        "recall",
        "status",
        "context_length",
        "delay",
        "break_stream",
        "words",
        "say",
        "refuse",
        "cached",
        "reasoning",
        "empty_chunks",
        "echo",
        "garbage",
        "content_parts",
    }
)

_OPTIONS = {
    "status": {"retry_after", "times"},
    "context_length": {"times"},
    "delay": {"times"},
    "break_stream": {"times"},
    "garbage": {"times"},
}


@dataclass(frozen=True)
class ToolCallDirective:
    """One scripted tool call; ``arguments`` is JSON text, or None to generate it from the tool's schema."""

    name: str
    arguments: str | None


@dataclass
class Directives:
    rounds: list[list[ToolCallDirective]] = field(default_factory=list)
    recall: bool = False
    status: int | None = None
    retry_after_s: float | None = None
    context_length: bool = False
    delay_s: float = 0.0
    break_stream_after: int | None = None
    words: int | None = None
    say: list[str] = field(default_factory=list)
    refusal: str | None = None  # ``[[refuse TEXT]]``: the model declines, saying TEXT
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    empty_chunks: bool = False
    echo: bool = False
    garbage: bool = False
    garbage_shape: bool = False  # ``[[garbage shape]]``: whole JSON of the wrong shape
    # ``[[content_parts]]``: the text as a list of content parts; "image" adds a part that is no
    # text, "bad" makes a part's ``text`` a number, "empty" sends an empty list (None: the text is
    # a plain string).
    content_parts: str | None = None
    # Faults given ``times=N`` (by keyword: status, context_length, delay, break_stream, garbage) hit
    # only the first N times the same request is seen; the rest always.
    times: dict[str, int] = field(default_factory=dict)


def _invalid(text: str, why: str) -> ApiError:
    return ApiError(400, f"invalid simulator directive {text!r}: {why}", param="messages")


def _number(text: str, raw: str, *, integer: bool) -> float:
    try:
        value = int(raw) if integer else float(raw)
    except ValueError as e:
        raise _invalid(text, f"{raw!r} is not a number") from e
    if value < 0:
        raise _invalid(text, "must not be negative")
    return value


def parse_directives(text: str) -> Directives:
    """Read every known directive of ``text``; ``[[word ...]]`` with an unknown word is left as plain text."""
    found = Directives()
    current_round: list[ToolCallDirective] = []
    position = 0
    while (match := _OPENING.search(text, position)) is not None:
        keyword = match.group(1)
        if keyword not in _KEYWORDS:
            position = match.end()
            continue
        if keyword == "call":
            call, position = _parse_call(text, match.end())
            current_round.append(call)
            continue
        end = text.find("]]", match.end())
        if end < 0:
            raise _invalid(text[match.start() : match.start() + 60], "no closing ]]")
        whole = text[match.start() : end + 2]
        position = end + 2
        if keyword == "say":
            found.say.append(text[match.end() : end].strip())
            continue
        if keyword == "refuse":
            found.refusal = text[match.end() : end].strip() or "I can't help with that."
            continue
        args = [a for a in text[match.end() : end].split() if "=" not in a]
        options = dict(a.partition("=")[::2] for a in text[match.end() : end].split() if "=" in a)
        unknown = set(options) - _OPTIONS.get(keyword, set())
        if unknown:
            raise _invalid(whole, f"unknown option {sorted(unknown)[0]!r}")
        if "times" in options:
            found.times[keyword] = int(_number(whole, options["times"], integer=True))
        if "retry_after" in options:
            found.retry_after_s = _number(whole, options["retry_after"], integer=False)
        if keyword == "then":
            if current_round:
                found.rounds.append(current_round)
                current_round = []
        elif keyword == "recall":
            found.recall = True
        elif keyword == "context_length":
            found.context_length = True
        elif keyword == "empty_chunks":
            found.empty_chunks = True
        elif keyword == "echo":
            found.echo = True
        elif keyword == "garbage":
            if args not in ([], ["shape"]):
                raise _invalid(whole, "expects nothing or 'shape'")
            found.garbage = True
            found.garbage_shape = args == ["shape"]
        elif keyword == "content_parts":
            if args not in ([], ["image"], ["bad"], ["empty"]):
                raise _invalid(whole, "expects nothing, 'image', 'bad' or 'empty'")
            found.content_parts = args[0] if args else "text"
        elif keyword == "status":
            if len(args) != 1:
                raise _invalid(whole, "expects a status code")
            found.status = int(_number(whole, args[0], integer=True))
            if not 400 <= found.status <= 599:
                raise _invalid(whole, "status must be 4xx or 5xx")
        else:
            if len(args) != 1:
                raise _invalid(whole, "expects exactly one number")
            if keyword == "delay":
                found.delay_s = _number(whole, args[0], integer=False)
            elif keyword == "break_stream":
                found.break_stream_after = int(_number(whole, args[0], integer=True))
            elif keyword == "words":
                found.words = max(1, int(_number(whole, args[0], integer=True)))
            elif keyword == "cached":
                found.cached_tokens = int(_number(whole, args[0], integer=True))
            elif keyword == "reasoning":
                found.reasoning_tokens = int(_number(whole, args[0], integer=True))
    if current_round:
        found.rounds.append(current_round)
    return found


def _parse_call(text: str, position: int) -> tuple[ToolCallDirective, int]:
    start = text.rfind("[[", 0, position)
    name_match = _NAME.match(text, position)
    if name_match is None:
        raise _invalid(text[start : start + 60], "call needs a tool name")
    name = name_match.group(1)
    position = name_match.end()
    while position < len(text) and text[position].isspace():
        position += 1
    arguments: str | None = None
    if text.startswith("{", position):
        try:
            value, end = json.JSONDecoder().raw_decode(text, position)
        except json.JSONDecodeError as e:
            raise _invalid(text[start : start + 60], f"arguments are not JSON: {e}") from e
        if not isinstance(value, dict):
            raise _invalid(text[start : start + 60], "arguments must be a JSON object")
        arguments = json.dumps(value, separators=(",", ":"))
        position = end
    while position < len(text) and text[position].isspace():
        position += 1
    if not text.startswith("]]", position):
        raise _invalid(text[start : start + 60], "expected ]] after the call")
    return ToolCallDirective(name, arguments), position + 2
