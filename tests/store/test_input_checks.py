"""The one JSON check every entry point uses: exact on the edges its fast paths take."""

from __future__ import annotations

import pytest

import store
from store.input_checks import quote_input

DEPTH = store.MAX_JSON_DEPTH


@pytest.mark.parametrize(
    ("text", "code", "param"),
    [
        ("[" * DEPTH + "]" * DEPTH, None, None),
        ("[" * (DEPTH + 1) + "]" * (DEPTH + 1), "nesting_too_deep", "[0]" * DEPTH),
        ('{"a":' * DEPTH + "1" + "}" * DEPTH, None, None),
        ('{"a":' * (DEPTH + 1) + "1" + "}" * (DEPTH + 1), "nesting_too_deep", "a" + ".a" * (DEPTH - 1)),
        ('{"a":[' * (DEPTH // 2) + "1" + "]}" * (DEPTH // 2), None, None),
        ('[{"k": "' + "[{" * 500 + '"}, ' + "[] , " * 1000 + "0]", None, None),  # brackets in strings
        ('["\\"[[[[[[", ' + "[" * (DEPTH - 1) + "]" * (DEPTH - 1) + "]", None, None),
        ("[" * 100_000 + "]" * 100_000, "nesting_too_deep", None),  # past Python's recursion limit
        ('{"a": "\\u0000"}', "nul_character", "a"),
        ('{"a": "\\\\u0000"}', None, None),  # a backslash, then the text u0000
        ('{"a": "\\\\\\u0000"}', "nul_character", "a"),
        ('{"a\\u0000": 1}', "nul_character", None),
        ('{"a": ["ok", "\\ud800"]}', "lone_surrogate", "a[1]"),
        ('{"a": "\\uDC00x"}', "lone_surrogate", "a"),
        ('{"a": "\\ud83d\\ude00"}', None, None),  # a pair is one character
        ('{"a": "\\\\ud800"}', None, None),
        ('{"a": [1, NaN]}', "non_finite_number", "a[1]"),
        ('{"a": -Infinity}', "non_finite_number", "a"),
        ('{"a": 1e999}', "non_finite_number", "a"),
        ('{"a": 1e308, "b": -0.0, "c": 123456789012345678901234567890}', None, None),
        ("[1, 2", "invalid_json", None),
    ],
)
def test_parse_json_refuses_exactly_what_cannot_be_kept(
    text: str, code: str | None, param: str | None
) -> None:
    if code is None:
        store.parse_json(text.encode())
        return
    with pytest.raises(store.JSONRejected) as caught:
        store.parse_json(text.encode())
    assert caught.value.code == code
    if param is not None:
        assert caught.value.param == param


def test_raw_surrogate_bytes_are_not_utf8() -> None:
    with pytest.raises(store.JSONRejected) as caught:
        store.parse_json(b'{"a": "\xed\xa0\x80"}')
    assert caught.value.code == "invalid_json"


def test_a_refused_key_path_is_bounded_and_storable() -> None:
    with pytest.raises(store.JSONRejected) as caught:
        store.parse_json(('{"' + "k\\ud800" * 10_000 + '": {"x": NaN}}').encode(), prefix="body.")
    param = caught.value.param
    assert param is not None
    assert len(param) < 250
    param.encode("utf-8")  # no lone surrogate left in what is stored and sent back


def test_quote_input_says_how_long_the_value_was() -> None:
    assert quote_input("short") == "'short'"
    quoted = quote_input("x" * 1_000_000)
    assert len(quoted) < 250
    assert "1000000 characters" in quoted
    assert quote_input("a\x00\ud800") == "'a\\x00\\ud800'"


@pytest.mark.parametrize(
    "text",
    [
        # An unclosed string of escaped quotes behind enough brackets to start the depth check:
        # the string pattern used to retry from every quote (80 KB took 22 s; 1 MiB hours).
        "[" * (DEPTH + 1) + '"' + '\\"' * (512 * 1024),
        "[" * (DEPTH + 1) + '"' * (1024 * 1024),
        "[" * (DEPTH + 1) + '"\\' * (512 * 1024),
    ],
)
def test_parse_json_is_linear_on_unclosed_strings(text: str) -> None:
    import time

    started = time.monotonic()
    with pytest.raises(store.JSONRejected) as refused:
        store.parse_json(text)
    # Linear work here is milliseconds; the old quadratic scan took hours: a huge margin.
    assert time.monotonic() - started < 2.0
    assert refused.value.code == "invalid_json"
