"""The ``[[...]]`` directive parser."""

from __future__ import annotations

import pytest

from simulator.directives import ToolCallDirective, parse_directives
from simulator.errors import ApiError


def test_calls_rounds_and_arguments_with_brackets() -> None:
    found = parse_directives(
        'go [[call search {"q": "a ]] b", "ids": [[1, 2]]}]] [[call noargs]] [[then]] [[ call other {} ]]'
    )
    assert found.rounds == [
        [ToolCallDirective("search", '{"q":"a ]] b","ids":[[1,2]]}'), ToolCallDirective("noargs", None)],
        [ToolCallDirective("other", "{}")],
    ]


def test_options_and_values() -> None:
    found = parse_directives(
        "[[status 429 retry_after=2.5 times=3]] [[delay 0.5]] [[break_stream 4 times=1]] [[words 7]] "
        "[[cached 10]] [[reasoning 3]] [[recall]] [[context_length]] [[empty_chunks]] [[say hello there]]"
    )
    assert found.status == 429
    assert found.retry_after_s == 2.5
    assert found.times == {"status": 3, "break_stream": 1}
    assert found.delay_s == 0.5
    assert found.break_stream_after == 4
    assert found.words == 7
    assert (found.cached_tokens, found.reasoning_tokens) == (10, 3)
    assert found.recall
    assert found.context_length
    assert found.empty_chunks
    assert found.say == ["hello there"]
    assert not found.garbage


def test_garbage() -> None:
    found = parse_directives("hello [[garbage]]")
    assert found.garbage
    assert found.times == {}
    assert parse_directives("[[garbage times=2]]").times == {"garbage": 2}
    assert not found.garbage_shape
    shaped = parse_directives("hello [[garbage shape times=1]]")
    assert (shaped.garbage, shaped.garbage_shape, shaped.times) == (True, True, {"garbage": 1})
    with pytest.raises(ApiError, match="expects nothing or 'shape'"):
        parse_directives("[[garbage cut]]")


def test_content_parts() -> None:
    assert parse_directives("hello").content_parts is None
    assert parse_directives("hello [[content_parts]]").content_parts == "text"
    assert parse_directives("[[content_parts image]]").content_parts == "image"
    assert parse_directives("[[content_parts bad]]").content_parts == "bad"
    assert parse_directives("[[content_parts empty]]").content_parts == "empty"
    with pytest.raises(ApiError, match="expects nothing, 'image', 'bad' or 'empty'"):
        parse_directives("[[content_parts audio]]")


def test_unknown_words_are_plain_text() -> None:
    found = parse_directives("see [[wiki link]] and [[Call x]]")
    assert found.rounds == []
    assert found.status is None


@pytest.mark.parametrize(
    "text",
    [
        "[[status abc]]",
        "[[status 200]]",
        "[[status 500 when=now]]",
        "[[delay]]",
        "[[delay -1]]",
        "[[call]]",
        "[[call f {not json}]]",
        "[[call f [1, 2]]]",
        "[[call f {} trailing]]",
        "[[words 3",
    ],
)
def test_malformed_directives_are_refused(text: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_directives(text)
    assert caught.value.status == 400
