"""``create`` POSTs over the clients' own aiohttp transport, not the SDK, and behaves as the SDK
path did: for every failure the simulator can produce over real HTTP, the error is the one the SDK
path maps the same answer to; the headers (less the SDK's X-Stainless-* telemetry) and body that
reach the upstream are the SDK's."""

from __future__ import annotations

import json
import socket
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from openai import DefaultAioHttpClient
from pydantic import BaseModel

from models import (
    BadRequest,
    InvalidProviderResponse,
    ModelClientError,
    OpenAIChatCompletionClient,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    UserMessage,
)
from models.openai.results import RESPONSE_INVALID
from models.openai.transport import SDK_USER_AGENT
from models.retry import RetryPolicy
from simulator import SimulatorServer
from tests.models.local_http import serving
from tests.models.test_answer_shape import BAD_COMPLETIONS, bad_completion

KEY = "sk-test-transport-key"


def client_at(base_url: str, *, through_sdk: bool, **kwargs: Any) -> OpenAIChatCompletionClient:
    """A client on the own transport, or (``through_sdk``) one whose ``create`` the SDK carries:
    a given ``http_client`` keeps the SDK path, the reference every mapping here is held to."""
    return OpenAIChatCompletionClient(
        model="gpt-4o",
        api_key=KEY,
        base_url=base_url,
        http_client=DefaultAioHttpClient() if through_sdk else None,
        **kwargs,
    )


async def failure_of(client: OpenAIChatCompletionClient, text: str) -> ModelClientError:
    try:
        with pytest.raises(ModelClientError) as caught:
            await client.create([UserMessage(content=text, source="user")])
    finally:
        await client.close()
    return caught.value


def described(error: ModelClientError) -> dict[str, Any]:
    """What a caller can see of an error (the request id differs per request: present or not)."""
    return {
        "type": type(error),
        "message": error.message,
        "status_code": error.status_code,
        "code": error.code,
        "retryable": error.retryable,
        "has_request_id": error.request_id is not None,
        "retry_after": getattr(error, "retry_after", None),
        "provider": error.provider,
        "model": error.model,
    }


@pytest.mark.parametrize(
    "text",
    [
        "[[status 400]]",
        "[[context_length]]",
        "[[status 401]]",
        "[[status 403]]",
        "[[status 404]]",
        "[[status 408]]",
        "[[status 409]]",
        "[[status 413]]",
        "[[status 422]]",
        "[[status 429]]",
        "[[status 429 retry_after=2.5]]",
        "[[status 500]]",
        "[[status 502]]",
        "[[status 503]]",
        "[[status 504]]",
    ],
)
async def test_each_status_maps_as_through_the_sdk(simulator: SimulatorServer, text: str) -> None:
    own = await failure_of(client_at(simulator.base_url, through_sdk=False), text)
    sdk = await failure_of(client_at(simulator.base_url, through_sdk=True), text)
    assert described(own) == described(sdk)
    assert isinstance(own.__cause__, Exception), "raised from the answer it maps"
    assert simulator.stats()["requests"] == 2, "one attempt each: no hidden retries"


async def test_retry_after_of_a_429_is_kept(simulator: SimulatorServer) -> None:
    client = client_at(simulator.base_url, through_sdk=False)
    error = await failure_of(client, "[[status 429 retry_after=2.5]]")
    assert isinstance(error, RateLimited)
    assert error.retry_after == pytest.approx(2.5)


async def test_an_unknown_model_and_a_wrong_key_map_as_through_the_sdk(simulator: SimulatorServer) -> None:
    simulator.configure(known_models=["gpt-4o-mini"])
    own = await failure_of(client_at(simulator.base_url, through_sdk=False), "hello")
    sdk = await failure_of(client_at(simulator.base_url, through_sdk=True), "hello")
    assert described(own) == described(sdk)
    assert own.code == "model_not_found"
    simulator.configure(known_models=None, require_api_key="sk-the-right-one")
    own = await failure_of(client_at(simulator.base_url, through_sdk=False), "hello")
    sdk = await failure_of(client_at(simulator.base_url, through_sdk=True), "hello")
    assert described(own) == described(sdk)
    assert own.status_code == 401


async def test_a_connection_dropped_after_the_headers_is_unavailable_on_both_paths(
    simulator: SimulatorServer,
) -> None:
    simulator.configure(rate_timeout=1.0, timeout_s=0.0)
    own = await failure_of(client_at(simulator.base_url, through_sdk=False), "hello")
    sdk = await failure_of(client_at(simulator.base_url, through_sdk=True), "hello")
    assert type(own) is type(sdk) is ProviderUnavailable
    assert own.retryable


async def test_a_refused_connection_is_unavailable_on_both_paths() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the call: nobody listens there
    url = f"http://127.0.0.1:{port}/v1"
    own = await failure_of(client_at(url, through_sdk=False), "hello")
    sdk = await failure_of(client_at(url, through_sdk=True), "hello")
    assert type(own) is type(sdk) is ProviderUnavailable
    assert own.status_code is None


async def test_a_slow_answer_times_out_on_both_paths(simulator: SimulatorServer) -> None:
    own = await failure_of(client_at(simulator.base_url, through_sdk=False, timeout=0.3), "[[delay 3]]")
    sdk = await failure_of(client_at(simulator.base_url, through_sdk=True, timeout=0.3), "[[delay 3]]")
    assert type(own) is type(sdk) is ProviderTimeout


async def test_create_never_builds_the_sdk_client(simulator: SimulatorServer) -> None:
    """The point of the transport: a plain ``create`` makes no SDK client (whose per-request
    request building cost 41% of a worker's CPU); one client session serves every call."""
    client = client_at(simulator.base_url, through_sdk=False)
    for number in range(3):
        result = await client.create([UserMessage(content=f"hello {number}", source="user")])
        assert isinstance(result.content, str)
    assert client._sdk_client is None
    await client.close()
    assert simulator.stats()["connections"] == 1, "one pooled connection for three calls in a row"


# --- what reaches the upstream: a recording server, since the simulator keeps no headers ---------

REPLY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "gpt-4o",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}


class Recorder:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply = json.dumps(REPLY).encode()
        self.status = 200


@pytest.fixture
def recording_server() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            recorder.requests.append(
                {
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(self.rfile.read(length)),
                }
            )
            self.send_response(recorder.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(recorder.reply)))
            self.send_header("x-request-id", "req-recorded")
            self.end_headers()
            self.wfile.write(recorder.reply)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    with serving(Handler) as root:
        yield f"{root}/v1", recorder


# Headers the SDK adds for its own telemetry (x-stainless-*) or that transports set differently
# (connection handling, compression): not part of what an upstream needs.
_TRANSPORT_OWN = ("x-stainless-", "host", "content-length", "accept-encoding", "connection")


def _sent_headers(request: dict[str, Any]) -> dict[str, str]:
    return {name: value for name, value in request["headers"].items() if not name.startswith(_TRANSPORT_OWN)}


async def test_headers_path_and_body_are_the_sdks(
    recording_server: tuple[str, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, recorder = recording_server
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-from-env")
    monkeypatch.delenv("OPENAI_ORG_ID", raising=False)
    settings: dict[str, Any] = {
        "organization": "org-given",
        "default_headers": {"X-Team": "batch", "User-Agent": "tokenmill-test/1"},
        "temperature": 0.25,
    }
    for through_sdk in (False, True):
        client = client_at(base_url, through_sdk=through_sdk, **settings)
        result = await client.create(
            [UserMessage(content="héllo \u2028 wörld", source="user")], extra_create_args={"seed": 7}
        )
        await client.close()
        assert result.content == "hi"
    own, sdk = recorder.requests
    assert own["path"] == sdk["path"] == "/v1/chat/completions"
    assert own["body"] == sdk["body"]
    assert _sent_headers(own) == _sent_headers(sdk)
    assert own["headers"]["authorization"] == f"Bearer {KEY}"
    assert own["headers"]["openai-organization"] == "org-given"
    assert own["headers"]["openai-project"] == "proj-from-env"
    assert own["headers"]["user-agent"] == "tokenmill-test/1", "default_headers override the SDK's"
    assert own["headers"]["x-team"] == "batch"


async def test_the_sdks_user_agent_and_the_org_from_the_environment(
    recording_server: tuple[str, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, recorder = recording_server
    monkeypatch.setenv("OPENAI_ORG_ID", "org-from-env")
    monkeypatch.delenv("OPENAI_PROJECT_ID", raising=False)
    client = client_at(base_url, through_sdk=False)
    await client.create([UserMessage(content="hello", source="user")])
    await client.close()
    [request] = recorder.requests
    assert request["headers"]["user-agent"] == SDK_USER_AGENT
    assert request["headers"]["openai-organization"] == "org-from-env"
    assert "openai-project" not in request["headers"]
    assert request["headers"]["content-type"] == "application/json"


async def invalid_on_both_paths(recording_server: tuple[str, Recorder], reply: bytes) -> ModelClientError:
    """``reply`` answered 2xx (so billed) to one call on the own transport and one through the SDK,
    each with a retry policy that would retry at once: the same non-retryable
    ``upstream_response_invalid`` on both paths, one request each. The own transport's error."""
    base_url, recorder = recording_server
    recorder.reply = reply
    policy = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0)
    own = await failure_of(client_at(base_url, through_sdk=False, retry_policy=policy), "hello")
    sdk = await failure_of(client_at(base_url, through_sdk=True, retry_policy=policy), "hello")
    assert described(own) == described(sdk)
    assert type(own) is InvalidProviderResponse
    assert own.retryable is False
    assert own.code == RESPONSE_INVALID
    assert len(recorder.requests) == 2, "one request per path, none retried"
    return own


@pytest.mark.parametrize(
    "reply",
    [
        b"not json",
        b"[1, 2]",
        b'"a string"',
        b"<html><body>502 Bad Gateway</body></html>",
        json.dumps(REPLY).encode()[:60],  # truncated, yet whole per its Content-Length
    ],
)
async def test_a_2xx_that_is_no_json_object_is_invalid_and_not_retried(
    recording_server: tuple[str, Recorder], reply: bytes
) -> None:
    """Answered 2xx, so billed: the same non-retryable error on both paths, naming the answer."""
    own = await invalid_on_both_paths(recording_server, reply)
    assert (own.provider, own.model, own.request_id) == ("openai-compatible", "gpt-4o", "req-recorded")


@pytest.mark.parametrize("name", list(BAD_COMPLETIONS))
async def test_a_2xx_object_of_the_wrong_shape_is_invalid_and_not_retried(
    recording_server: tuple[str, Recorder], name: str
) -> None:
    """A JSON object that is no ``chat.completion`` (``"choices": "x"``, a message that is a
    string, ...) was answered and billed too: the same non-retryable error on both paths, naming
    the answer's id, where it used to be a bare AttributeError/TypeError the lane ran again."""
    own = await invalid_on_both_paths(recording_server, json.dumps(bad_completion(name)).encode())
    assert BAD_COMPLETIONS[name][1] in own.message
    # The answer's own id when it has one (a string), else the response's x-request-id.
    expected_id = "chatcmpl-shape" if name != "id-an-array" else "req-recorded"
    assert (own.provider, own.model, own.request_id) == ("openai-compatible", "gpt-4o", expected_id)


# The SDK builds its error from ``data = body.get("error", body)`` and reads code and type from
# ``data`` only: a bare-string ``error`` has no code and is not the message; a top-level ``code``
# beside an ``error`` object is not read. Both paths must land on the same error for the same bytes.
@pytest.mark.parametrize(
    ("status", "reply"),
    [
        (400, b'{"error": "This model\'s maximum context length is 8192 tokens"}'),
        (429, b'{"error": {"type": "insufficient_quota"}, "code": "rate_limit_exceeded"}'),
        (429, b'{"error": {"message": "slow down", "code": "insufficient_quota"}, "code": null}'),
        (429, b'{"error": {"error": {"code": "insufficient_quota"}}}'),
        (400, b'{"message": "too many tokens", "code": "context_length_exceeded"}'),
        (400, b'{"error": {"message": "half \\ud83d", "code": "invalid_value", "param": NaN}}'),
        (500, b'{"error": {"message": "", "type": "server_error"}}'),
        (503, b"upstream overloaded"),
        (429, b'["rate", "limited"]'),
    ],
)
async def test_error_bodies_map_as_through_the_sdk(
    recording_server: tuple[str, Recorder], status: int, reply: bytes
) -> None:
    base_url, recorder = recording_server
    recorder.status, recorder.reply = status, reply
    own = await failure_of(client_at(base_url, through_sdk=False), "hello")
    sdk = await failure_of(client_at(base_url, through_sdk=True), "hello")
    assert described(own) == described(sdk)
    assert len(recorder.requests) == 2


class Metadata(BaseModel):
    team: str


@pytest.mark.parametrize(
    "extra",
    [{"seed": 10**30}, {"seed": -(2**64)}, {"metadata": Metadata(team="batch")}],
    ids=["int-beyond-64-bits", "negative-int-beyond-64-bits", "pydantic-object"],
)
async def test_what_orjson_cannot_encode_is_sent_as_the_sdk_sends_it(
    recording_server: tuple[str, Recorder], extra: dict[str, Any]
) -> None:
    base_url, recorder = recording_server
    for through_sdk in (False, True):
        client = client_at(base_url, through_sdk=through_sdk)
        result = await client.create([UserMessage(content="hello", source="user")], extra_create_args=extra)
        await client.close()
        assert result.content == "hi"
    own, sdk = recorder.requests
    assert own["body"] == sdk["body"]
    assert own["body"].get("seed") == extra.get("seed")


async def test_a_body_nothing_can_encode_is_a_bad_request_not_a_type_error(
    recording_server: tuple[str, Recorder],
) -> None:
    base_url, recorder = recording_server
    for unencodable in (object(), "half \ud83d"):
        client = client_at(base_url, through_sdk=False)
        with pytest.raises(BadRequest) as caught:
            await client.create(
                [UserMessage(content="hello", source="user")], extra_create_args={"user": unencodable}
            )
        await client.close()
        assert not caught.value.retryable
    assert recorder.requests == [], "refused before anything is sent"


@pytest.mark.parametrize(
    "extra_json",
    [b'"x_score": NaN', b'"x_score": Infinity', b'"x_score": -Infinity'],
)
async def test_a_2xx_the_stdlib_reads_is_a_result_on_both_paths(
    recording_server: tuple[str, Recorder], extra_json: bytes
) -> None:
    """orjson refuses NaN, +-Infinity and a lone surrogate escape that ``json.loads`` (the SDK's
    reader) takes; the provider billed for the answer, so it is a result, not a retry."""
    base_url, recorder = recording_server
    reply = dict(REPLY, choices=[dict(REPLY["choices"][0], message={"role": "assistant", "content": "X"})])
    recorder.reply = (
        json.dumps(reply).encode().replace(b'"content": "X"', b'"content": "half \\ud83d"')[:-1]
        + b", "
        + extra_json
        + b"}"
    )
    results = []
    for through_sdk in (False, True):
        client = client_at(base_url, through_sdk=through_sdk)
        results.append(await client.create([UserMessage(content="hello", source="user")]))
        await client.close()
    own, sdk = results
    assert own.content == sdk.content == "half \ud83d"
    assert own.usage == sdk.usage
    assert len(recorder.requests) == 2


# --- proxies from the environment: the recording server stands in for a forward proxy ------------

_PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "REQUEST_METHOD")


def _proxy_environment(monkeypatch: pytest.MonkeyPatch, settings: dict[str, str]) -> None:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: nobody listens there


@pytest.mark.parametrize(
    ("settings", "through_proxy"),
    [
        ({"ALL_PROXY": "{proxy}"}, True),
        ({"all_proxy": "{proxy}"}, True),
        ({"HTTP_PROXY": "{proxy}"}, True),
        ({"http_proxy": "{proxy}", "HTTPS_PROXY": "http://127.0.0.1:{dead}"}, True),
        ({"ALL_PROXY": "http://127.0.0.1:{dead}", "HTTP_PROXY": "{proxy}"}, True),
        ({"ALL_PROXY": "http://127.0.0.1:{dead}", "NO_PROXY": "127.0.0.1"}, False),
        ({"ALL_PROXY": "http://127.0.0.1:{dead}", "no_proxy": "example.org, 127.0.0.0/8"}, False),
        ({"HTTPS_PROXY": "http://127.0.0.1:{dead}"}, False),
    ],
)
async def test_the_environments_proxy_is_chosen_as_by_the_sdk(
    recording_server: tuple[str, Recorder],
    monkeypatch: pytest.MonkeyPatch,
    settings: dict[str, str],
    through_proxy: bool,
) -> None:
    """The recording server is either the proxy (the request line then carries the upstream's
    absolute URL) or, where the environment exempts it or names no proxy for http, the upstream."""
    base_url, recorder = recording_server
    proxy_url = base_url.removesuffix("/v1")
    dead = _closed_port()
    _proxy_environment(
        monkeypatch, {name: value.format(proxy=proxy_url, dead=dead) for name, value in settings.items()}
    )
    # Through the proxy, the upstream's name is never resolved here: only the proxy is dialled.
    target = "http://upstream.invalid/v1" if through_proxy else base_url
    for through_sdk in (False, True):
        client = client_at(target, through_sdk=through_sdk)
        result = await client.create([UserMessage(content="hello", source="user")])
        await client.close()
        assert result.content == "hi"
    own, sdk = recorder.requests
    expected = "http://upstream.invalid/v1/chat/completions" if through_proxy else "/v1/chat/completions"
    assert own["path"] == sdk["path"] == expected


async def test_proxy_credentials_in_the_url_are_sent_to_the_proxy(
    recording_server: tuple[str, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, recorder = recording_server
    _proxy_environment(monkeypatch, {"all_proxy": base_url.replace("http://", "http://egress:s3cret@")})
    own_client = client_at("http://upstream.invalid/v1", through_sdk=False)
    await own_client.create([UserMessage(content="hello", source="user")])
    await own_client.close()
    sdk_client = client_at("http://upstream.invalid/v1", through_sdk=True)
    with warnings.catch_warnings():
        # The SDK's vendored aiohttp transport still passes aiohttp's deprecated BasicAuth.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        await sdk_client.create([UserMessage(content="hello", source="user")])
    await sdk_client.close()
    own, sdk = recorder.requests
    assert own["headers"]["proxy-authorization"] == sdk["headers"]["proxy-authorization"]
    assert own["headers"]["proxy-authorization"].startswith("Basic ")


async def test_an_https_proxy_is_left_to_the_sdk_path(
    recording_server: tuple[str, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp cannot speak TLS to a proxy: rather than going around it (direct, where an egress
    proxy is the only way out), ``create`` goes through the SDK's client, as streams do, and
    fails or succeeds as that path does."""
    base_url, _ = recording_server
    _proxy_environment(
        monkeypatch, {"ALL_PROXY": base_url.replace("http://", "https://").removesuffix("/v1")}
    )
    own_client = client_at(base_url, through_sdk=False)
    outcomes = []
    for client in (own_client, client_at(base_url, through_sdk=True)):
        try:
            await client.create([UserMessage(content="hello", source="user")])
            outcomes.append(("result", None))
        except ModelClientError as error:
            outcomes.append(("error", type(error)))
        finally:
            if client is own_client:
                assert client._sdk_client is not None, "create went through the SDK's client"
            await client.close()
    own, sdk = outcomes
    assert own == sdk
