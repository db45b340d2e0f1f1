"""The workers build their upstream clients with the provider the settings name."""

from __future__ import annotations

import pytest

from config import Settings
from models.providers import UnknownProvider
from models.types import UserMessage
from simulator.testing import SimulatorServer
from workers.clients import build_pipeline


async def test_the_default_provider_calls_the_openai_protocol_at_the_given_url() -> None:
    with SimulatorServer() as server:
        pipeline = build_pipeline(
            Settings(broker_url=None, upstream_timeout_seconds=30.0),
            cache=False,
            client_env={"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "simulated"},
        )
        try:
            client = pipeline.client_for("gpt-4o-mini")
            result = await client.create([UserMessage(content="hello", source="user")])
        finally:
            await pipeline.close()
    assert result.finish_reason == "stop"
    assert client.cache_identity["provider"] == "openai-compatible"
    assert client.cache_identity["base_url"].startswith(server.base_url.rstrip("/"))


async def test_the_azure_provider_is_chosen_by_name() -> None:
    pipeline = build_pipeline(
        Settings(broker_url=None, provider="azure"),
        cache=False,
        client_env={
            "AZURE_OPENAI_ENDPOINT": "https://tokenmill-test.openai.azure.com",
            "OPENAI_API_VERSION": "2024-10-21",
            "AZURE_OPENAI_API_KEY": "azure-test-key",
        },
    )
    try:
        identity = pipeline.client_for("gpt-4o").cache_identity
    finally:
        await pipeline.close()
    assert identity["provider"] == "azure"
    assert identity["azure_deployment"] == "gpt-4o"
    assert identity["base_url"].startswith(
        "https://tokenmill-test.openai.azure.com/openai/deployments/gpt-4o"
    )


def test_an_unknown_provider_fails_when_the_pipeline_is_built() -> None:
    with pytest.raises(UnknownProvider, match="known are azure, openai"):
        build_pipeline(Settings(broker_url=None, provider="anthropic"), cache=False)
