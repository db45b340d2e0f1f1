"""Errors in OpenAI's shape, injected faults and dropped streams, as the openai SDK sees them."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from simulator.errors import ConfigError
from simulator.testing import SimulatorServer


@pytest.fixture
def client(simulator: SimulatorServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=simulator.base_url, api_key="sim", max_retries=0, timeout=10) as client:
        yield client


def ask(client: openai.OpenAI, text: str, model: str = "sim-small", **options: Any) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **options
    )


def test_429_directive_carries_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, "hi [[status 429 retry_after=2]]")
    error = caught.value
    assert error.status_code == 429
    assert error.response.headers["retry-after"] == "2"
    assert error.response.headers["retry-after-ms"] == "2000"
    assert error.code == "rate_limit_exceeded"
    assert isinstance(error.body, dict)
    assert set(error.body) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (403, openai.PermissionDeniedError),
        (500, openai.InternalServerError),
        (503, openai.InternalServerError),
    ],
)
def test_status_directive(
    client: openai.OpenAI, status: int, error_type: type[openai.APIStatusError]
) -> None:
    with pytest.raises(error_type) as caught:
        ask(client, f"[[status {status}]]")
    assert caught.value.status_code == status


def test_context_length_exceeded(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, "[[context_length]]")
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"
    simulator.configure(max_context_tokens=50)
    ask(client, "short")
    with pytest.raises(openai.BadRequestError, match="maximum context length is 50"):
        ask(client, "long " * 100)


def test_unknown_model_404(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    simulator.configure(known_models=["sim-small"])
    ask(client, "fine")
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, "hi", model="gpt-nope")
    assert caught.value.code == "model_not_found"
    assert "gpt-nope" in caught.value.message


def test_wrong_api_key_401_and_key_never_echoed(simulator: SimulatorServer) -> None:
    simulator.configure(require_api_key="sk-right-key")
    good = openai.OpenAI(base_url=simulator.base_url, api_key="sk-right-key", max_retries=0)
    bad = openai.OpenAI(base_url=simulator.base_url, api_key="sk-wrong-key", max_retries=0)
    ask(good, "hi")
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(bad, "hi")
    assert caught.value.code == "invalid_api_key"
    assert "sk-wrong-key" not in str(caught.value.body)
    config = httpx.get(f"{simulator.url}/_sim/config").json()
    stats = httpx.get(f"{simulator.url}/_sim/stats").text
    assert config["require_api_key"] == "***"
    assert "sk-right-key" not in stats
    assert "sk-wrong-key" not in stats


def test_delay_directive_waits(client: openai.OpenAI) -> None:
    started = time.monotonic()
    ask(client, "[[delay 0.3]]")
    assert time.monotonic() - started >= 0.3


def test_global_fault_rates_hold(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    simulator.configure(rate_429=0.2, rate_500=0.1, retry_after_s=0.5, seed=7)
    outcomes: dict[str, int] = {"ok": 0, "429": 0, "500": 0}
    retry_afters: set[str] = set()
    for index in range(400):
        try:
            ask(client, f"request {index}")
            outcomes["ok"] += 1
        except openai.RateLimitError as e:
            retry_afters.add(e.response.headers["retry-after"])
            outcomes["429"] += 1
        except openai.InternalServerError:
            outcomes["500"] += 1
    assert retry_afters == {"0.5"}
    assert 50 <= outcomes["429"] <= 110  # 80 expected
    assert 20 <= outcomes["500"] <= 65  # 40 expected
    stats = simulator.stats()
    assert stats["by_status"] == {str(k) if k != "ok" else "200": v for k, v in outcomes.items() if v}
    assert stats["accepted"] == outcomes["ok"]


def test_fault_draws_repeat_for_a_seed(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    def pattern() -> list[bool]:
        simulator.reset()
        simulator.configure(rate_500=0.5, seed=3)
        result = []
        for _ in range(30):
            try:
                ask(client, "x")
                result.append(True)
            except openai.InternalServerError:
                result.append(False)
        return result

    first = pattern()
    assert True in first
    assert False in first
    assert pattern() == first


def test_simulated_timeout_drops_the_connection(simulator: SimulatorServer) -> None:
    simulator.configure(rate_timeout=1.0, timeout_s=0.2)
    client = openai.OpenAI(base_url=simulator.base_url, api_key="sim", max_retries=0, timeout=5)
    with pytest.raises(openai.APIConnectionError):
        ask(client, "hang")
    impatient = openai.OpenAI(base_url=simulator.base_url, api_key="sim", max_retries=0, timeout=0.1)
    simulator.configure(timeout_s=1.0)
    with pytest.raises(openai.APITimeoutError):
        ask(impatient, "hang")
    time.sleep(1.0)  # let the server finish its hang before the stats are read
    stats = simulator.stats()
    assert stats["timeouts"] == 2
    assert stats["by_status"] == {"timeout": 2}


def test_broken_stream_raises_in_the_sdk(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    stream = ask(client, "[[words 40]] [[break_stream 3]]", stream=True)
    received: list[Any] = []
    with pytest.raises((httpx.RemoteProtocolError, openai.APIError)):
        received.extend(stream)
    assert len(received) == 3
    simulator.configure(break_stream_after=2)
    with pytest.raises((httpx.RemoteProtocolError, openai.APIError)):
        list(ask(client, "[[words 40]]", stream=True))
    stats = simulator.stats()
    assert stats["broken_streams"] == 2
    assert stats["accepted"] == 0
    assert stats["completion_tokens"] == 0


def test_empty_chunks_are_interleaved_and_harmless(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    plain = list(ask(client, "[[words 20]]", stream=True))
    simulator.configure(empty_chunks=True)
    noisy = list(ask(client, "[[words 20]]", stream=True, stream_options={"include_usage": True}))
    assert len(noisy) > len(plain) + 5
    assert any(c.choices == [] and c.usage is None for c in noisy)
    assert any(
        c.choices and c.choices[0].delta.content is None and c.choices[0].finish_reason is None for c in noisy
    )

    def text(chunks: list[Any]) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert text(noisy) == text(plain)
    assert noisy[-1].usage is not None


def test_rpm_limit_refuses_beyond_the_limit(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    simulator.configure(rpm_limit=5)
    for _ in range(5):
        ask(client, "within")
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, "beyond")
    assert 0 < float(caught.value.response.headers["retry-after"]) <= 60


def test_invalid_config_is_refused(simulator: SimulatorServer) -> None:
    with pytest.raises(ConfigError):
        simulator.configure(rate_429=2)
    with pytest.raises(ConfigError):
        simulator.configure(no_such_setting=1)
    answer = httpx.post(f"{simulator.url}/_sim/config", json={"rate_500": "lots"})
    assert answer.status_code == 400
    assert "error" in answer.json()


def test_malformed_requests_get_400(simulator: SimulatorServer) -> None:
    url = f"{simulator.base_url}/chat/completions"
    assert httpx.post(url, content=b"{not json").status_code == 400
    missing = httpx.post(url, json={"messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "model"
    bad_directive = httpx.post(
        url, json={"model": "m", "messages": [{"role": "user", "content": "[[status abc]]"}]}
    )
    assert bad_directive.status_code == 400
    assert "directive" in bad_directive.json()["error"]["message"]


def test_times_option_fails_then_succeeds(client: openai.OpenAI, simulator: SimulatorServer) -> None:
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            ask(client, "flaky [[status 500 times=2]]")
    ok = ask(client, "flaky [[status 500 times=2]]")
    assert ok.choices[0].message.content
    with pytest.raises(openai.InternalServerError):
        ask(client, "another request [[status 500 times=2]]")  # counted per request
    stream = ask(client, "[[words 30]] [[break_stream 2 times=1]]", stream=True)
    with pytest.raises((httpx.RemoteProtocolError, openai.APIError)):
        list(stream)
    text = "".join(
        c.choices[0].delta.content or ""
        for c in ask(client, "[[words 30]] [[break_stream 2 times=1]]", stream=True)
        if c.choices
    )
    assert len(text.split()) == 30
    simulator.reset()  # forgets what it has seen
    with pytest.raises(openai.InternalServerError):
        ask(client, "flaky [[status 500 times=2]]")


def test_sdk_retries_honour_retry_after(simulator: SimulatorServer) -> None:
    with openai.OpenAI(base_url=simulator.base_url, api_key="sim", max_retries=2, timeout=10) as client:
        started = time.monotonic()
        reply = ask(client, "[[status 429 retry_after=0.3 times=2]]")
        elapsed = time.monotonic() - started
    assert reply.choices[0].message.content
    assert elapsed >= 0.6
    assert simulator.stats()["by_status"] == {"429": 2, "200": 1}


def test_required_key_stays_out_of_the_process_list() -> None:
    with SimulatorServer(require_api_key="sk-secret-123") as server:
        pid = httpx.get(f"{server.url}/_sim/health").json()["pid"]
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert b"sk-secret-123" not in cmdline.read()
        with openai.OpenAI(base_url=server.base_url, api_key="sk-secret-123", max_retries=0) as client:
            assert ask(client, "hi").choices[0].message.content


def test_client_hanging_up_mid_stream_leaves_the_server_clean(simulator: SimulatorServer) -> None:
    simulator.configure(stream_chunk_delay_ms=30)
    body = {"model": "m", "messages": [{"role": "user", "content": "[[words 50]]"}], "stream": True}
    with (
        httpx.Client() as http,
        http.stream("POST", f"{simulator.base_url}/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 5
    while simulator.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert simulator.stats()["in_flight"] == 0
    with openai.OpenAI(base_url=simulator.base_url, api_key="sim", max_retries=0) as client:
        assert ask(client, "still fine").choices[0].message.content


def test_garbage_answers_200_with_a_whole_body_that_is_no_json(simulator: SimulatorServer) -> None:
    """``[[garbage]]``: a 200, ``application/json``, the body complete per its Content-Length and
    unreadable; a stream's first event likewise. Counted as a request of its model, not accepted."""
    request = {"model": "garbage-model", "messages": [{"role": "user", "content": "hi [[garbage]]"}]}
    answer = httpx.post(f"{simulator.base_url}/chat/completions", json=request, timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    assert int(answer.headers["content-length"]) == len(answer.content) > 0
    assert answer.headers["x-request-id"].startswith("req_")
    with pytest.raises(ValueError, match=r"Unterminated|Expecting"):
        json.loads(answer.content)
    streamed = httpx.post(
        f"{simulator.base_url}/chat/completions", json={**request, "stream": True}, timeout=10
    )
    assert streamed.status_code == 200
    first, done = streamed.text.split("\n\n")[:2]
    assert first.startswith("data: {")
    assert done == "data: [DONE]"
    with pytest.raises(ValueError, match=r"Unterminated|Expecting"):
        json.loads(first.removeprefix("data: "))
    stats = simulator.stats()
    assert stats["by_model"] == {"garbage-model": 2}
    assert stats["by_status"] == {"200": 2}
    assert (stats["requests"], stats["accepted"], stats["completion_tokens"]) == (2, 0, 0)


def test_garbage_times_answers_after_the_first(client: openai.OpenAI) -> None:
    with pytest.raises(ValueError, match=r"Unterminated|Expecting"):  # the SDK's json.loads
        ask(client, "flaky [[garbage times=1]]")
    ok = ask(client, "flaky [[garbage times=1]]")
    assert ok.choices[0].message.content


def test_garbage_shape_answers_200_with_whole_json_of_the_wrong_shape(simulator: SimulatorServer) -> None:
    """``[[garbage shape]]``: a whole JSON object whose first choice's message (a stream's delta)
    is a string; counted as ``[[garbage]]`` is."""
    request = {"model": "shape-model", "messages": [{"role": "user", "content": "hi [[garbage shape]]"}]}
    answer = httpx.post(f"{simulator.base_url}/chat/completions", json=request, timeout=10)
    assert answer.status_code == 200
    assert int(answer.headers["content-length"]) == len(answer.content)
    body = answer.json()
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["choices"][0]["message"], str)
    assert body["choices"][0]["message"]
    streamed = httpx.post(
        f"{simulator.base_url}/chat/completions", json={**request, "stream": True}, timeout=10
    )
    assert streamed.status_code == 200
    first, done = streamed.text.split("\n\n")[:2]
    event = json.loads(first.removeprefix("data: "))
    assert event["object"] == "chat.completion.chunk"
    assert isinstance(event["choices"][0]["delta"], str)
    assert done == "data: [DONE]"
    stats = simulator.stats()
    assert stats["by_model"] == {"shape-model": 2}
    assert stats["by_status"] == {"200": 2}
    assert (stats["requests"], stats["accepted"], stats["completion_tokens"]) == (2, 0, 0)
