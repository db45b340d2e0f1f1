"""AzureOpenAIChatCompletionClient calls Azure's deployment URL with Azure's auth header.

The simulator serves OpenAI's paths only, so a tiny local HTTP server records what the SDK sends.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
from openai import DefaultAioHttpClient

from models import AuthenticationFailed, AzureOpenAIChatCompletionClient, UserMessage
from models.providers import ProviderOptions, UnknownProvider, provider_client_factory, provider_names
from tests.models.local_http import serving

AZURE_KEY = "azure-test-key-1234"

REPLY = {
    "id": "chatcmpl-azure-1",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello from Azure."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
}


class Recorder:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []


def make_handler(recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            recorder.requests.append(
                {
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(self.rfile.read(length)),
                }
            )
            payload = json.dumps(REPLY).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.send_header("x-request-id", "azure-req-1")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    return Handler


@pytest.fixture
def azure_server() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    with serving(make_handler(recorder)) as root:
        yield root, recorder


async def test_azure_deployment_url_and_api_key_header(azure_server: tuple[str, Recorder]) -> None:
    endpoint, recorder = azure_server
    client = AzureOpenAIChatCompletionClient(
        model="gpt-4o",
        azure_endpoint=endpoint,
        azure_deployment="my-gpt4o",
        api_version="2024-10-21",
        api_key=AZURE_KEY,
    )
    result = await client.create([UserMessage(content="hello", source="user")])
    await client.close()

    assert result.content == "Hello from Azure."
    assert result.model == "gpt-4o-2024-08-06"
    assert result.usage.prompt_tokens == 9
    [request] = recorder.requests
    assert request["path"] == "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"
    assert request["headers"]["api-key"] == AZURE_KEY
    assert "authorization" not in request["headers"]
    assert request["body"]["messages"] == [{"role": "user", "content": "hello"}]
    identity = client.cache_identity
    assert identity["provider"] == "azure"
    assert identity["api_version"] == "2024-10-21"
    assert identity["azure_deployment"] == "my-gpt4o"
    assert AZURE_KEY not in json.dumps(identity)


async def test_azure_from_environment_and_token_provider(
    azure_server: tuple[str, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, recorder = azure_server
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", endpoint)
    monkeypatch.setenv("OPENAI_API_VERSION", "2025-01-01-preview")
    monkeypatch.delenv("AZURE_OPENAI_API_KEY", raising=False)
    with pytest.raises(AuthenticationFailed, match="AZURE_OPENAI_API_KEY"):
        AzureOpenAIChatCompletionClient(model="gpt-4o-mini")

    client = AzureOpenAIChatCompletionClient(
        model="gpt-4o-mini", azure_ad_token_provider=lambda: "entra-token"
    )
    await client.create([UserMessage(content="hi", source="user")])
    await client.close()
    [request] = recorder.requests
    assert (
        request["path"] == "/openai/deployments/gpt-4o-mini/chat/completions?api-version=2025-01-01-preview"
    )
    assert request["headers"]["authorization"] == "Bearer entra-token"


async def test_the_azure_provider_builds_clients_from_its_variables(
    azure_server: tuple[str, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint, recorder = azure_server
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "http://127.0.0.1:9/unused-when-overridden")
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", AZURE_KEY)
    monkeypatch.delenv("OPENAI_API_VERSION", raising=False)
    options = ProviderOptions(
        timeout=30.0, env={"AZURE_OPENAI_ENDPOINT": endpoint, "OPENAI_API_VERSION": "2024-10-21"}
    )
    client = provider_client_factory("azure", options)("gpt-4o")
    result = await client.create([UserMessage(content="hello", source="user")])
    await client.close()

    assert isinstance(client, AzureOpenAIChatCompletionClient)
    assert result.content == "Hello from Azure."
    [request] = recorder.requests
    # The overrides win over the process environment; what they leave out comes from it.
    assert request["path"] == "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    assert request["headers"]["api-key"] == AZURE_KEY


def test_an_unknown_provider_is_refused_with_the_known_ones() -> None:
    with pytest.raises(UnknownProvider, match=r"'anthropic': known are azure, openai"):
        provider_client_factory("anthropic", ProviderOptions())
    assert provider_names() == ["azure", "openai"]


def _failing_provider() -> str:
    raise ValueError("no cached token and the identity endpoint said no")


async def _async_provider_of_nothing() -> object:
    return None


@pytest.mark.parametrize(
    "token_provider",
    [_failing_provider, lambda: 42, lambda: "", _async_provider_of_nothing],
    ids=["raises-ValueError", "returns-int", "returns-empty", "async-returns-None"],
)
@pytest.mark.parametrize("through_sdk", [False, True])
async def test_a_token_provider_that_fails_is_a_credentials_error(
    azure_server: tuple[str, Recorder], token_provider: Any, through_sdk: bool
) -> None:
    """Not "malformed provider response" (retried, as if the provider had answered) nor a bare
    exception: nothing was sent, and the credentials are what is wrong."""
    endpoint, recorder = azure_server
    client = AzureOpenAIChatCompletionClient(
        model="gpt-4o-mini",
        azure_endpoint=endpoint,
        api_version="2024-10-21",
        azure_ad_token_provider=token_provider,
        http_client=DefaultAioHttpClient() if through_sdk else None,
    )
    with pytest.raises(AuthenticationFailed, match="azure_ad_token_provider") as caught:
        await client.create([UserMessage(content="hi", source="user")])
    await client.close()
    assert not caught.value.retryable
    assert recorder.requests == []


async def test_an_async_token_provider_is_awaited_on_both_paths(azure_server: tuple[str, Recorder]) -> None:
    endpoint, recorder = azure_server

    async def provider() -> str:
        return "entra-async-token"

    for through_sdk in (False, True):
        client = AzureOpenAIChatCompletionClient(
            model="gpt-4o-mini",
            azure_endpoint=endpoint,
            api_version="2024-10-21",
            azure_ad_token_provider=provider,
            http_client=DefaultAioHttpClient() if through_sdk else None,
        )
        await client.create([UserMessage(content="hi", source="user")])
        await client.close()
    assert [r["headers"]["authorization"] for r in recorder.requests] == ["Bearer entra-async-token"] * 2
