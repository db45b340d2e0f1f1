"""A client on the simulator whose retry policy would retry anything retryable at once, for the
tests that prove an answer already billed is *not* asked for again."""

from __future__ import annotations

from openai import DefaultAioHttpClient

from models import OpenAIChatCompletionClient, UserMessage
from models.retry import RetryPolicy
from simulator import SimulatorServer


def client_for(simulator: SimulatorServer, *, through_sdk: bool = False) -> OpenAIChatCompletionClient:
    # A retry policy that would retry anything retryable at once: none of it may apply here.
    return OpenAIChatCompletionClient(
        model="gpt-4o",
        api_key="sk-test-retry-ready",
        base_url=simulator.base_url,
        http_client=DefaultAioHttpClient() if through_sdk else None,
        retry_policy=RetryPolicy(max_attempts=4, base_delay=0.0, max_delay=0.0),
    )


def user(text: str) -> UserMessage:
    return UserMessage(content=text, source="user")
