"""Each upstream failure maps onto the error tree with the right retryability."""

from __future__ import annotations

import email.utils
import pickle
import socket

import pytest

from models import (
    AuthenticationFailed,
    BadRequest,
    ContextWindowExceeded,
    ModelClientError,
    ModelNotFound,
    OpenAIChatCompletionClient,
    ProviderTimeout,
    ProviderUnavailable,
    QuotaExceeded,
    RateLimited,
    UserMessage,
    from_openai_error,
    parse_retry_after,
)
from models.errors import MAX_RETRY_AFTER_SECONDS
from simulator import SimulatorServer

KEY = "sk-test-errors-key"


async def failure(client: OpenAIChatCompletionClient, text: str) -> ModelClientError:
    with pytest.raises(ModelClientError) as caught:
        await client.create([UserMessage(content=text, source="user")])
    return caught.value


@pytest.mark.parametrize(
    ("directive", "expected", "retryable", "status"),
    [
        ("[[status 400]]", BadRequest, False, 400),
        ("[[context_length]]", ContextWindowExceeded, False, 400),
        ("[[status 401]]", AuthenticationFailed, False, 401),
        ("[[status 403]]", AuthenticationFailed, False, 403),
        ("[[status 404]]", ModelNotFound, False, 404),
        ("[[status 408]]", ProviderTimeout, True, 408),
        ("[[status 422]]", BadRequest, False, 422),
        ("[[status 429]]", RateLimited, True, 429),
        ("[[status 500]]", ProviderUnavailable, True, 500),
        ("[[status 502]]", ProviderUnavailable, True, 502),
        ("[[status 503]]", ProviderUnavailable, True, 503),
        ("[[status 504]]", ProviderTimeout, True, 504),
    ],
)
async def test_status_mapping(
    simulator: SimulatorServer, directive: str, expected: type[ModelClientError], retryable: bool, status: int
) -> None:
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=simulator.base_url)
    error = await failure(client, directive)
    await client.close()
    assert type(error) is expected
    assert error.retryable is retryable
    assert error.status_code == status
    assert error.request_id, "the provider's request id is kept for support tickets"
    assert (error.provider, error.model) == ("openai-compatible", "gpt-4o")
    assert isinstance(error.__cause__, Exception), "raised from the SDK's exception"
    assert simulator.stats()["requests"] == 1, "the SDK's hidden retries are off"


async def test_retry_after_is_read(simulator: SimulatorServer) -> None:
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=simulator.base_url)
    error = await failure(client, "[[status 429 retry_after=2.5]]")
    await client.close()
    assert isinstance(error, RateLimited)
    assert error.retry_after == pytest.approx(2.5)


async def test_unknown_model_is_permanent(simulator: SimulatorServer) -> None:
    simulator.configure(known_models=["gpt-4o"])
    client = OpenAIChatCompletionClient(model="gpt-9", api_key=KEY, base_url=simulator.base_url)
    error = await failure(client, "hello")
    await client.close()
    assert isinstance(error, ModelNotFound)
    assert not error.retryable
    assert error.code == "model_not_found"


async def test_wrong_key_is_authentication_failed(simulator: SimulatorServer) -> None:
    simulator.configure(require_api_key="sk-the-right-one")
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=simulator.base_url)
    error = await failure(client, "hello")
    await client.close()
    assert isinstance(error, AuthenticationFailed)
    assert error.status_code == 401


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the call: nobody listens there
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=f"http://127.0.0.1:{port}/v1")
    error = await failure(client, "hello")
    await client.close()
    assert isinstance(error, ProviderUnavailable)
    assert error.retryable
    assert error.status_code is None


async def test_timeout_is_provider_timeout(simulator: SimulatorServer) -> None:
    client = OpenAIChatCompletionClient(model="gpt-4o", api_key=KEY, base_url=simulator.base_url, timeout=0.3)
    error = await failure(client, "slow [[delay 3]]")
    await client.close()
    assert isinstance(error, ProviderTimeout)
    assert error.retryable


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == pytest.approx(1.5)
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30.0)
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "-4"}) == 0.0


def test_parse_retry_after_refuses_non_finite_and_caps_huge_waits() -> None:
    """``inf`` parses as a float; a wait past any budget or an overflow in ``now + wait`` would
    follow. A non-finite value is unreadable; a finite one is capped."""
    for value in ("inf", "Infinity", "-inf", "nan"):
        assert parse_retry_after({"retry-after": value}) is None, value
        assert parse_retry_after({"retry-after-ms": value}) is None, value
    assert parse_retry_after({"retry-after": "1e300"}) == MAX_RETRY_AFTER_SECONDS
    assert parse_retry_after({"retry-after-ms": "1e300"}) == MAX_RETRY_AFTER_SECONDS
    far = email.utils.formatdate(2_000_000_000 + 10 * 365 * 86400, usegmt=True)
    assert parse_retry_after({"retry-after": far}, now=2_000_000_000) == MAX_RETRY_AFTER_SECONDS


def test_insufficient_quota_is_not_retried() -> None:
    import httpx2
    import openai

    request = httpx2.Request("POST", "https://api.openai.com/v1/chat/completions")
    response = httpx2.Response(429, request=request, headers={"retry-after": "1", "x-request-id": "req_1"})
    body = {
        "message": "You exceeded your current quota",
        "type": "insufficient_quota",
        "code": "insufficient_quota",
    }
    sdk_error = openai.RateLimitError("quota", response=response, body=body)
    error = from_openai_error(sdk_error, provider="openai", model="gpt-4o")
    assert isinstance(error, QuotaExceeded)
    assert isinstance(error, RateLimited)
    assert not error.retryable
    assert error.request_id == "req_1"
    assert error.retry_after == 1.0


def test_errors_survive_pickling() -> None:
    """Celery moves exceptions between processes by pickle."""
    error = RateLimited(
        "slow down", retry_after=2.0, provider="openai", model="gpt-4o", status_code=429, code="x"
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is RateLimited
    assert (copy.message, copy.retry_after, copy.status_code, copy.code, copy.retryable) == (
        "slow down",
        2.0,
        429,
        "x",
        True,
    )
    overridden = pickle.loads(pickle.dumps(BadRequest("odd", retryable=True)))
    assert overridden.retryable is True
    assert str(copy) == str(error)
