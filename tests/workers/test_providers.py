"""The workers build their upstream clients with the provider the settings name."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import pytest

from config import Settings
from models.base import ChatCompletionClient, DelegatingClient
from models.providers import UnknownProvider
from models.retry import RetryPolicy
from models.types import CreateResult, LLMMessage, UserMessage
from simulator.testing import SimulatorServer
from workers.clients import build_pipeline, openai_client_factory
from workers.pipeline import ModelCallPipeline
from workers.rate_limits import LocalRateLimiter


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


class ClosesCounted(DelegatingClient):
    """A provider's client, counting the times it is closed."""

    def __init__(self, client: ChatCompletionClient) -> None:
        super().__init__(client)
        self.closes = 0

    async def create(self, messages: Sequence[LLMMessage], **options: Any) -> CreateResult:
        return await self._client.create(messages, **options)

    def create_stream(
        self, messages: Sequence[LLMMessage], **options: Any
    ) -> AsyncGenerator[str | CreateResult, None]:
        return self._client.create_stream(messages, **options)

    async def close(self) -> None:
        self.closes += 1
        await super().close()


async def test_a_pipeline_keeps_clients_for_its_latest_models_only(simulator: SimulatorServer) -> None:
    """Model names are any string a tenant sends: past ``max_models`` the least recently used
    model's client is dropped and closed, but not under a call still in flight on it."""
    provider = openai_client_factory(base_url=simulator.base_url, api_key="sim", timeout=10)
    built: dict[str, list[ClosesCounted]] = {}

    def factory(model: str) -> ChatCompletionClient:
        client = ClosesCounted(provider(model))
        built.setdefault(model, []).append(client)
        return client

    pipeline = ModelCallPipeline(factory, LocalRateLimiter({}), RetryPolicy(max_attempts=1), max_models=2)
    try:
        slow = asyncio.create_task(
            pipeline.create("m0", [UserMessage(content="slow [[delay 2]]", source="u")])
        )
        deadline = time.monotonic() + 30
        while simulator.stats()["in_flight"] < 1:
            assert time.monotonic() < deadline, "the slow call never arrived"
            await asyncio.sleep(0.02)
        for model in ["m1", "m2", "m3"]:
            await pipeline.create(model, [UserMessage(content="hi", source="u")])
        assert built["m0"][0].closes == 0, "closed under its call in flight"
        assert (await slow).content
        assert built["m0"][0].closes == 1, "closed once its call ended"
        while built["m1"][0].closes < 1:
            assert time.monotonic() < deadline, "the dropped client was never closed"
            await asyncio.sleep(0.02)
        await pipeline.create("m0", [UserMessage(content="again", source="u")])
        assert len(built["m0"]) == 2  # built anew: the pipeline held on to no more than two
        assert [len(built[m]) for m in ("m1", "m2", "m3")] == [1, 1, 1]
    finally:
        await pipeline.close()


async def test_a_call_naming_a_new_model_costs_the_worker_no_more_than_one_it_knows(
    simulator: SimulatorServer,
) -> None:
    """Model names are any string a tenant sends, and each new one gets a client of its own. Each
    such client built its TLS context on its first call (CA certificates loaded and parsed: ~26 ms
    of CPU on the worker's event loop, every call of every tenant on that worker waiting): a
    batch naming a new model per line cost its worker some 20 times the CPU of a plain call,
    while the fair share counts calls, not CPU. The context is built once per process."""
    pipeline = ModelCallPipeline(
        openai_client_factory(base_url=simulator.base_url, api_key="sim", timeout=10),
        LocalRateLimiter({}),
        RetryPolicy(max_attempts=1),
    )
    prompt = [UserMessage(content="hi", source="u")]

    async def cpu_per_call(models: list[str]) -> float:
        started = time.process_time()
        for model in models:
            await pipeline.create(model, prompt)
        return (time.process_time() - started) / len(models)

    try:
        await cpu_per_call(["known", "warm-up"])
        known = await cpu_per_call(["known"] * 30)
        new = await cpu_per_call([f"new-{i}" for i in range(30)])
    finally:
        await pipeline.close()
    # Before: 24 ms a call naming a new model, against 0.6 ms (after: 1.1 ms).
    assert new - known < 0.008, (
        f"{new * 1000:.1f} ms of CPU a call naming a new model, {known * 1000:.1f} known"
    )
