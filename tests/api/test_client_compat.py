"""What the official ``openai`` SDK (and LangChain and AutoGen, which call through it) expects of an
OpenAI-compatible server, against a live API, a real worker and the simulator: every choice of a
streamed ``n`` > 1 call reaches the caller, and an answer that must not be asked for again tells
the SDK so (its default ``max_retries=2`` retries every 5xx unless ``x-should-retry: false``)."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import httpx
import openai
import pytest

import store
from models.openai.results import RESPONSE_INVALID
from simulator.testing import SimulatorServer
from store import UPSTREAM_AUTHENTICATION_FAILED
from tests.api.conftest import LiveAPI
from tests.api.test_interactive_lane import Lane, ask, lane  # noqa: F401 - the fixture

pytestmark = pytest.mark.slow


def test_a_streamed_call_with_n_choices_delivers_every_choice(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    """``n: 2`` streamed: both choices, as the provider answers them, from the provider and then
    from the cache (a plain call too). The second used to be dropped by the worker's stream reader
    (billed by the provider, never delivered, nor kept for the cache's later hits)."""
    lane.cluster.worker("w1")
    with lane.sdk as sdk:
        question = ask("two answers please [[words 6]]", n=2)
        direct = httpx.post(f"{simulator.base_url}/chat/completions", json=question, timeout=30).json()
        expected = {choice["index"]: choice["message"]["content"] for choice in direct["choices"]}
        assert len(expected) == 2
        for attempt in ("upstream", "cache hit"):
            texts: dict[int, str] = defaultdict(str)
            finish: dict[int, str | None] = {}
            for chunk in sdk.chat.completions.create(**question, stream=True):
                for choice in chunk.choices:
                    texts[choice.index] += choice.delta.content or ""
                    if choice.finish_reason is not None:
                        finish[choice.index] = choice.finish_reason
            assert dict(texts) == expected, attempt
            assert finish == {0: "stop", 1: "stop"}, attempt
        plain = sdk.chat.completions.create(**question)
        assert {choice.index: choice.message.content for choice in plain.choices} == expected


def test_a_streamed_call_delivers_the_logprobs_it_asked_for(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    """``logprobs: true`` streamed: the stream's chunks carry them, as the plain call's body does
    (the SDK's stream helper, LangChain and AutoGen add up each chunk's). They used to be kept in
    the ledger and never sent on a stream."""
    lane.cluster.worker("w1")
    question = ask("weigh my words [[words 5]]", logprobs=True, top_logprobs=2)
    direct = httpx.post(f"{simulator.base_url}/chat/completions", json=question, timeout=30).json()
    expected = direct["choices"][0]["logprobs"]["content"]
    for attempt in ("upstream", "cache hit"):
        with lane.sdk as sdk, sdk.chat.completions.stream(**question) as stream:
            for _ in stream:
                pass
            final = stream.get_final_completion()
        logprobs = final.choices[0].logprobs
        assert logprobs is not None, attempt
        assert [item.model_dump(exclude_none=True) for item in logprobs.content or []] == expected, attempt


def test_a_streamed_refusal_reaches_the_caller(
    lane: Lane,  # noqa: F811
) -> None:
    """A model that refuses streams ``delta.refusal`` (structured outputs): the caller gets it,
    streamed as plain. It used to be dropped: an empty answer, which the SDK's stream helper then
    failed to parse as the requested JSON."""
    lane.cluster.worker("w1")
    question = ask("Do the bad thing [[refuse I will not do that.]]")
    with lane.sdk as sdk:
        for attempt in ("upstream", "cache hit"):
            with sdk.chat.completions.stream(**question) as stream:
                for _ in stream:
                    pass
                final = stream.get_final_completion()
            message = final.choices[0].message
            assert (message.content, message.refusal) == (None, "I will not do that."), attempt
        plain = sdk.chat.completions.create(**question)
    assert plain.choices[0].message.refusal == "I will not do that."


@pytest.mark.parametrize(
    ("directive", "code"),
    [("[[garbage]]", RESPONSE_INVALID), ("[[status 401]]", UPSTREAM_AUTHENTICATION_FAILED)],
    ids=["billed-unreadable", "upstream-refused-credentials"],
)
def test_a_final_502_is_not_retried_by_the_sdk(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
    directive: str,
    code: str,
) -> None:
    """A 502 that asking again cannot mend (an answer billed but unreadable, the provider refusing
    tokenmill's credentials) says ``x-should-retry: false``: the SDK with its default retries
    asks once. It used to ask three times, paying the provider for each unreadable answer."""
    lane.cluster.worker("w1")
    model = f"no-sdk-retry-{code}"
    with openai.OpenAI(base_url=f"{lane.root}/v1", api_key=lane.key, timeout=120) as sdk:  # max_retries=2
        with pytest.raises(openai.InternalServerError) as raised:
            sdk.chat.completions.create(**{**ask(f"answer me {directive}"), "model": model})
        assert raised.value.status_code == 502
        assert raised.value.code == code
        assert raised.value.response.headers["x-should-retry"] == "false"
        assert simulator.stats()["by_model"][model] == 1


def test_a_retryable_502_leaves_the_sdk_its_retries(lane: Lane) -> None:  # noqa: F811
    """The provider failing (5xx past the worker's own retries) is no final answer: no
    ``x-should-retry`` header, so the SDK's own policy stands."""
    lane.cluster.worker("w1")
    response = httpx.post(
        f"{lane.root}/v1/chat/completions",
        headers=lane.headers,
        json=ask("fail me [[status 500]]"),
        timeout=120,
    )
    assert response.status_code == 502, response.text
    assert "x-should-retry" not in response.headers


def test_the_sdks_batch_create_arguments_are_accepted(live_api: LiveAPI) -> None:
    """``batches.create(output_expires_after=...)`` is an argument of the SDK's own signature: it
    used to be refused as an unknown field (400). Accepted and checked as OpenAI checks it; output
    files are made from the ledger and kept until deleted, so it never shortens what is kept."""
    with openai.OpenAI(
        base_url=live_api.base_url, api_key=live_api.new_key("expiring"), max_retries=0
    ) as sdk:
        line = {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}]},
        }
        uploaded = sdk.files.create(
            file=("in.jsonl", json.dumps(line).encode()),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 3600},
        )
        batch = sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 86400},
        )
        assert sdk.batches.retrieve(batch.id).id == batch.id
        for wrong in ({"anchor": "completed_at", "seconds": 86400}, {"anchor": "created_at", "seconds": 60}):
            with pytest.raises(openai.BadRequestError, match="output_expires_after"):
                sdk.batches.create(
                    input_file_id=uploaded.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                    output_expires_after=wrong,  # type: ignore[arg-type]
                )


def test_a_failed_call_names_its_request_id_as_an_answered_one_does(
    lane: Lane,  # noqa: F811
) -> None:
    """The SDK reads ``x-request-id`` into every exception's ``request_id`` (what a user quotes to
    find the call): a call the provider refused carries it as a success does. It used to be sent
    with successes only."""
    lane.cluster.worker("w1")
    with lane.sdk as sdk, pytest.raises(openai.BadRequestError) as raised:
        sdk.chat.completions.create(**ask("refuse me [[status 400]]"))
    [row] = lane.requests()
    assert raised.value.request_id == row.id


def test_a_spent_daily_budget_is_not_retried_by_the_sdk(live_api: LiveAPI) -> None:
    """A spent daily budget is a 429 until midnight UTC: ``x-should-retry: false``, so that the
    SDK's default retries (and LangChain's, AutoGen's) do not ask twice more in vain."""
    key = live_api.new_key("spent")
    assert live_api.cli("tenants", "set", "spent", "--daily-budget-usd", "0").returncode == 0
    with openai.OpenAI(base_url=live_api.base_url, api_key=key, max_retries=0) as sdk:
        with pytest.raises(openai.RateLimitError) as raised:
            sdk.chat.completions.create(**ask("anything"))
        assert raised.value.code == "daily_budget_exceeded"
        assert raised.value.response.headers["x-should-retry"] == "false"
        # When it is accepted again, for a client that reads it (the SDK gives up: 'false' above).
        assert 0 < int(raised.value.response.headers["retry-after"]) <= 24 * 3600


def test_files_list_pages_in_the_order_asked_for(live_api: LiveAPI) -> None:
    """``files.list(order="asc")`` (an argument of the SDK's): oldest first, paged by ``after`` as
    the SDK's iteration does. The order used to be ignored: newest first whatever was asked."""
    with openai.OpenAI(base_url=live_api.base_url, api_key=live_api.new_key("orderly"), max_retries=0) as sdk:
        for i in range(3):
            sdk.files.create(file=(f"in-{i}.jsonl", b'{"prompt": "hi"}\n'), purpose="batch")
        newest_first = [file.id for file in sdk.files.list()]
        assert len(newest_first) == 3
        assert [file.id for file in sdk.files.list(order="desc", limit=1)] == newest_first
        assert [file.id for file in sdk.files.list(order="asc", limit=1)] == newest_first[::-1]
        first_page = sdk.files.list(order="asc", limit=2)
        assert [file.id for file in first_page.data] == newest_first[::-1][:2]
        assert first_page.has_more
        with pytest.raises(openai.BadRequestError, match="order"):
            sdk.files.list(order="sideways")  # type: ignore[arg-type]


def test_a_provider_that_keeps_refusing_for_load_is_a_rate_limit_error_in_time(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    """A provider answering 429 to every try: past the single call's rate-limit budget the caller
    gets a 429 (``openai.RateLimitError``, as the provider's own would be), long before its wait
    runs out; the ledger keeps one failure. It used to be handed back and retried until the API's
    wait ended (600 s by default) and then answered 503, which the SDK retried twice more."""
    lane.cluster.env.update(
        TOKENMILL_HAND_BACK_AFTER_SECONDS="1", TOKENMILL_INTERACTIVE_RATE_LIMIT_RETRY_SECONDS="3"
    )
    lane.cluster.worker("w1")
    lane.cluster.beat()
    started = time.monotonic()
    with lane.sdk as sdk, pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(**ask("always busy [[status 429 retry_after=0.2]]"))
    assert time.monotonic() - started < 60  # the API would wait 600 s (its default) for an answer
    assert raised.value.status_code == 429
    [row] = lane.requests()
    assert raised.value.request_id == row.id
    assert row.status == store.RequestStatus.FAILED


def test_a_rate_limit_past_the_calls_budget_says_when_to_ask_again(
    lane: Lane,  # noqa: F811
    simulator: SimulatorServer,
) -> None:
    """The 429 of a call whose rate-limit budget is spent carries the provider's last Retry-After,
    in OpenAI's shape (``retry-after`` in whole seconds, ``retry-after-ms``), so that the SDK's
    retries wait as the provider asked. It had none: the SDK retried after its own half-second
    backoff, twice, each retry spending another full budget of a worker's retries."""
    lane.cluster.env.update(
        TOKENMILL_HAND_BACK_AFTER_SECONDS="1", TOKENMILL_INTERACTIVE_RATE_LIMIT_RETRY_SECONDS="2"
    )
    lane.cluster.worker("w1")
    lane.cluster.beat()
    with lane.sdk as sdk, pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(**ask("always busy [[status 429 retry_after=1.5]]"))
    headers = raised.value.response.headers
    assert (headers.get("retry-after"), headers.get("retry-after-ms")) == ("2", "1500")
    assert raised.value.code == "rate_limit_exceeded"
