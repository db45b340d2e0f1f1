"""A request's tools count toward its rate-limit reservation, also those sent as the caller wrote
them (a free-form tool, a key beside ``function``: ``models.openai.requests``), which travel in
``extra_create_args``: left out, a tenant's huge custom tool descriptions reserved nothing of the
model's shared tokens-per-minute budget."""

from __future__ import annotations

from config.settings import ModelLimits
from models import UserMessage
from models.openai import request_from_openai_body
from models.retry import RetryPolicy
from tests.models.counting_client import CountingClient
from workers.pipeline import GovernedClient
from workers.rate_limits import LocalRateLimiter

DESCRIPTION = "word " * 4000


def _estimate(body_tools: list[dict[str, object]]) -> int:
    limiter = LocalRateLimiter({"m": ModelLimits(tpm=10_000_000)})
    client = GovernedClient(
        CountingClient("m"), limiter, RetryPolicy(), model="m", endpoint="http://x.test/v1"
    )
    request = request_from_openai_body(
        {"model": "m", "messages": [{"role": "user", "content": "q"}], "tools": body_tools}
    )
    arguments = request.create_kwargs()
    return client._estimate(request.messages, arguments["tools"], arguments["extra_create_args"])


def test_tools_sent_as_written_count_toward_the_reservation() -> None:
    function = {"name": "sql", "description": DESCRIPTION, "parameters": {"type": "object", "properties": {}}}
    typed = _estimate([{"type": "function", "function": function}])
    bare = _estimate([])
    assert typed > bare + 3000
    as_written = _estimate(
        [{"type": "function", "function": function, "cache_control": {"type": "ephemeral"}}]
    )
    assert as_written >= typed
    custom = _estimate([{"type": "custom", "custom": {"name": "sql", "description": DESCRIPTION}}])
    assert custom > bare + 3000


async def test_tools_in_extra_create_args_that_are_no_objects_go_to_the_provider_to_judge() -> None:
    """An agent run's ``extra_create_args`` are the tenant's JSON, unchecked: ``"tools": ["x", 1]``
    there made the reservation's estimate raise AttributeError inside the worker, where before
    the provider answered it (a 400 the run reports). What is no tool object counts nothing."""
    limiter = LocalRateLimiter({"m": ModelLimits(tpm=10_000_000)})
    counting = CountingClient("m")
    client = GovernedClient(counting, limiter, RetryPolicy(), model="m", endpoint="http://x.test/v1")
    result = await client.create(
        [UserMessage(content="q", source="user")], extra_create_args={"tools": ["x", 1, None]}
    )
    assert result.content
