"""Field by field what OpenAI answers (the official ``openai`` SDK's types are the reference), against
a live API: a batch's files, batch creation's arguments, a stream's chunks, an empty answer."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from simulator.testing import SimulatorServer
from tests.api.conftest import LiveAPI
from tests.api.test_interactive_lane import Lane, ask, lane, sse_events  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


def batch_line(custom_id: str, content: str) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "sim-model", "messages": [{"role": "user", "content": content}]},
    }


@pytest.mark.parametrize("window", ["1h", "48h", "7d", ""])
def test_a_completion_window_other_than_24h_is_refused_naming_it(live_api: LiveAPI, window: str) -> None:
    """OpenAI takes ``completion_window: "24h"`` only (the SDK's ``Literal["24h"]``) and answers
    anything else 400 naming the param. Any ``<n>h`` used to be taken (a "1h" batch then expired
    after an hour), and other values refused with a message of tokenmill's own."""
    with openai.OpenAI(
        base_url=live_api.base_url, api_key=live_api.new_key(f"window-{window}"), max_retries=0
    ) as sdk:
        uploaded = sdk.files.create(
            file=("in.jsonl", json.dumps(batch_line("a", "hi")).encode()), purpose="batch"
        )
        with pytest.raises(openai.BadRequestError) as refused:
            sdk.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window=window,  # type: ignore[arg-type]
            )
        assert refused.value.param == "completion_window"
        assert refused.value.type == "invalid_request_error"
        assert "24h" in refused.value.message
        assert sdk.batches.list().data == []  # nothing was created


def wait_for_batch(sdk: openai.OpenAI, batch_id: str, status: str, seconds: float = 120) -> Any:
    deadline = time.monotonic() + seconds
    while (batch := sdk.batches.retrieve(batch_id)).status != status:
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}"
        time.sleep(0.2)
    return batch


def test_a_batchs_output_and_error_files_say_their_real_size(lane: Lane) -> None:  # noqa: F811
    """``files.retrieve`` / ``files.list`` of a batch's output and error files: ``bytes`` is the
    length of what ``files.content`` serves, as OpenAI's is. Both used to say ``bytes: 0``."""
    lane.cluster.worker("w1")
    lines = [
        batch_line(f"ok-{i}" + ("-é✓" if i % 2 else ""), f"question {i} [[words {i + 1}]]") for i in range(5)
    ]
    lines += [batch_line(f"bad-{i}-\u00fc", f"question {i} [[status 400]]") for i in range(2)]
    with lane.sdk as sdk:
        uploaded = sdk.files.create(
            file=("in.jsonl", b"".join(json.dumps(line).encode() + b"\n" for line in lines)), purpose="batch"
        )
        created = sdk.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = wait_for_batch(sdk, created.id, "completed")
        listed = {file.id: file.bytes for file in sdk.files.list()}
        for file_id in (done.output_file_id, done.error_file_id):
            assert file_id is not None
            content = sdk.files.content(file_id).content
            assert content  # both files have lines
            assert sdk.files.retrieve(file_id).bytes == len(content)
            assert listed[file_id] == len(content)
            assert sdk.files.retrieve(file_id).bytes == len(content)  # the size as kept, read again
        assert listed[uploaded.id] == uploaded.bytes


def chunks_of(lane: Lane, question: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:  # noqa: F811
    """(the cache header, every chunk) of ``question`` streamed, over plain HTTP: each field as sent."""
    with httpx.stream(
        "POST",
        f"{lane.root}/v1/chat/completions",
        headers=lane.headers,
        json={**question, "stream": True},
        timeout=120,
    ) as response:
        assert response.status_code == 200, response.read()
        return response.headers["tokenmill-cache"], list(sse_events(response))


def test_every_chunk_of_a_stream_has_the_streams_one_id_created_and_model(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    """OpenAI's chunks of one stream share one ``id`` (``chatcmpl-...``), one ``created`` and one
    ``model`` (its end chunks and its usage chunk too; ``n`` > 1 as well), relayed from the
    provider or replayed from the cache. The relayed chunks said the model asked for and the end
    chunks the model that answered (``gpt-4o-mini`` then ``gpt-4o-mini-2024-07-18``)."""
    lane.cluster.worker("w1")
    simulator.configure(stream_chunk_chars=8, answered_model_suffix="-2024-07-18")
    question = ask("[[words 12]] one stream", n=2, stream_options={"include_usage": True})
    for expected in ("miss", "hit"):
        cache, chunks = chunks_of(lane, question)
        assert cache == expected
        assert len(chunks) > 3
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]
        assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
        ids = {chunk["id"] for chunk in chunks}
        assert len(ids) == 1, (expected, ids)
        assert ids.pop().startswith("chatcmpl-")
        assert len({chunk["created"] for chunk in chunks}) == 1, expected
        assert len({chunk["model"] for chunk in chunks}) == 1, (
            expected,
            {chunk["model"] for chunk in chunks},
        )
    with lane.sdk as sdk:
        plain = sdk.chat.completions.create(**question)
        streamed = list(sdk.chat.completions.create(**question, stream=True))
    # A stream's chunks go out before the answer names its model: they name the one asked for.
    # Left as found: a plain call names the answer's (carrying it to the stream's first chunk
    # needs it from the provider's first chunk, through the worker's relay).
    assert plain.model == "lane-model-2024-07-18"
    assert {chunk.model for chunk in streamed} == {"lane-model"}


def test_an_empty_list_of_content_parts_is_the_same_empty_answer_plain_streamed_and_cached(
    lane: Lane,  # noqa: F811
) -> None:
    """A provider answering ``content: []``: the caller reads ``""`` (OpenAI's empty answer: a
    string, as the SDK's stream helper adds up a stream's first ``content: ""``), whether the call
    was plain or streamed, paid or a cache hit. A plain call said ``""`` and a streamed one
    ``null``, and a plain call served from a streamed call's cached answer said ``null`` too."""
    lane.cluster.worker("w1")
    with lane.sdk as sdk:
        for prompt in ("plain first [[content_parts empty]]", "streamed first [[content_parts empty]]"):
            calls = ("plain", "streamed") if prompt.startswith("plain") else ("streamed", "plain")
            for call in (*calls, *calls):  # paid, then each a cache hit
                if call == "plain":
                    content = sdk.chat.completions.create(**ask(prompt)).choices[0].message.content
                else:
                    with sdk.chat.completions.stream(**ask(prompt)) as stream:
                        content = stream.get_final_completion().choices[0].message.content
                assert content == "", (prompt, call)


def test_a_cache_hit_is_a_completion_of_its_own_id_and_a_replay_is_the_same(lane: Lane) -> None:  # noqa: F811
    """Every completion OpenAI answers has an ``id`` of its own; a replay of the same call
    (``Idempotency-Key``) is that call's answer again, id included. A plain cache hit used to
    answer the ``id`` (and body) of the call that paid: two calls, one completion id."""
    lane.cluster.worker("w1")
    with lane.sdk as sdk:
        paid = sdk.chat.completions.with_raw_response.create(**ask("who am i"))
        hit = sdk.chat.completions.with_raw_response.create(**ask("who am i"))
    assert (paid.headers["tokenmill-cache"], hit.headers["tokenmill-cache"]) == ("miss", "hit")
    assert hit.parse().id.startswith("chatcmpl-")
    assert hit.parse().id != paid.parse().id
    assert hit.parse().choices[0].message.content == paid.parse().choices[0].message.content
    replayed = [
        httpx.post(
            f"{lane.root}/v1/chat/completions",
            headers={**lane.headers, "Idempotency-Key": "who-am-i"},
            json=ask("who am i"),
            timeout=120,
        ).json()["id"]
        for _ in range(2)
    ]
    assert replayed[0] == replayed[1]
    assert replayed[0] not in (paid.parse().id, hit.parse().id)
