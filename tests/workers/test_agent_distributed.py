"""The seed's SimpleAgent example on ``DistributedAgentRuntime``: real ``tokenmill worker``
subprocesses, a Redis broker, PostgreSQL for agent state, the simulator over HTTP. The example's
code is the local test's, but for the runtime's class."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa

from agents import AgentId, CantHandleException, UndeliverableException
from models.openai import OpenAIChatCompletionClient
from simulator.testing import SimulatorServer
from store import AgentMessage, load_agent_state
from tests.agents.distributed_agents import Block, BlockingAgent
from tests.agents.seed_example import Message, SimpleAgent, SimpleAgentWithContext
from tests.cluster import Cluster, kill_group
from tests.workers.support import Ledger
from workers.agent_runtime import DistributedAgentRuntime
from workers.constants import DEFAULT_QUEUE

pytestmark = pytest.mark.slow

AGENT_MODULE = "tests.agents.distributed_agents"


def agent_cluster(cluster: Callable[..., Cluster], workers: int) -> Cluster:
    c = cluster()
    c.env["TOKENMILL_AGENT_MODULES"] = json.dumps([AGENT_MODULE])
    c.env["TOKENMILL_DEFAULT_MODEL"] = "sim-model"
    for n in range(workers):
        c.worker(f"agents{n}", concurrency=4)
    return c


async def test_seed_example_on_the_distributed_runtime(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    make_ledger(postgres_url)  # the schema
    c = agent_cluster(cluster, workers=1)
    model_client = OpenAIChatCompletionClient(model="gpt-4o-mini", base_url=simulator.base_url, api_key="sim")

    runtime = DistributedAgentRuntime(c.settings, reply_timeout=60)
    await SimpleAgent.register(
        runtime,
        "simple_agent",
        lambda: SimpleAgent(model_client=model_client),
    )
    runtime.start()
    message = Message("Hello, what are some fun things to do in Seattle? [[say Space Needle]]")
    response = await runtime.send_message(message, AgentId("simple_agent", "default"))
    await runtime.stop()
    await model_client.close()

    assert isinstance(response, Message)
    assert "Space Needle" in response.content
    # The model call was made by the worker (its client), not by the producer's client.
    assert simulator.stats()["completions"] == 1
    assert model_client.total_usage().completion_tokens == 0


async def test_state_lives_in_sql_across_workers_and_errors_come_back(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    led = make_ledger(postgres_url)
    c = agent_cluster(cluster, workers=2)
    model_client = OpenAIChatCompletionClient(model="gpt-4o-mini", base_url=simulator.base_url, api_key="sim")
    runtime = DistributedAgentRuntime(c.settings, tenant_id=led.tenant_id, reply_timeout=60)
    await SimpleAgentWithContext.register(runtime, "ctx_agent", lambda: SimpleAgentWithContext(model_client))
    runtime.start()
    agent = AgentId("ctx_agent", "default")
    first = await runtime.send_message(Message("Remember the word [[say pelican]]"), agent)
    second = await runtime.send_message(Message("What did you say before? [[recall]]"), agent)
    other = await runtime.send_message(
        Message("What did you say before? [[recall]]"), AgentId("ctx_agent", "x")
    )
    with pytest.raises(CantHandleException):
        await runtime.send_message("not a Message", agent)
    with pytest.raises(UndeliverableException):
        await runtime.send_message(Message("hi"), AgentId("nobody", "default"))
    await runtime.stop()
    await model_client.close()

    assert "pelican" in first.content
    assert "recall:" in second.content
    assert "pelican" in second.content
    assert "pelican" not in other.content
    state = load_agent_state(led.engine, "ctx_agent", "default", led.tenant_id)
    assert state is not None
    messages = state["model_contexts"]["_model_context"]["messages"]
    assert len(messages) == 4
    assert load_agent_state(led.engine, "ctx_agent", "default") is None  # another tenant's (none)


async def test_the_broker_carries_ids_and_sql_the_message(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """Ledger first, for agent messages: while a message waits for a worker, its text is in SQL and
    nowhere in the broker; a worker started later reads it from SQL and answers."""
    led = make_ledger(postgres_url)
    c = cluster()
    c.env["TOKENMILL_AGENT_MODULES"] = json.dumps([AGENT_MODULE])
    c.env["TOKENMILL_DEFAULT_MODEL"] = "sim-model"
    runtime = DistributedAgentRuntime(c.settings, tenant_id=led.tenant_id, reply_timeout=60)
    model_client = OpenAIChatCompletionClient(model="gpt-4o-mini", base_url=simulator.base_url, api_key="sim")
    await SimpleAgent.register(runtime, "simple_agent", lambda: SimpleAgent(model_client=model_client))
    runtime.start()
    secret = "the-launch-code-is-7741"
    sending = asyncio.ensure_future(
        runtime.send_message(Message(f"Keep this: {secret} [[say noted]]"), AgentId("simple_agent", "k"))
    )
    # No worker yet: the Celery message waits in the broker.
    deadline = time.monotonic() + 10
    while not c.broker.llen(DEFAULT_QUEUE) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    # Kombu keeps a message as JSON with its body base64-encoded: read the bodies as a worker would.
    broker_bytes = b"".join(
        base64.b64decode(json.loads(value)["body"]) for value in c.broker.lrange(DEFAULT_QUEUE, 0, -1)
    )
    assert b"message_id" in broker_bytes
    assert secret.encode() not in broker_bytes
    with led.engine.connect() as conn:
        stored = conn.execute(sa.select(AgentMessage.payload)).scalars().all()
    assert any(secret in json.dumps(payload) for payload in stored)

    c.worker("agents0", concurrency=4)
    reply = await sending
    await runtime.stop()
    await model_client.close()
    assert "noted" in reply.content


async def test_a_handler_slower_than_the_redis_socket_timeout_still_replies(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """The model answers in 6 s, beyond redis-py's default 5 s socket timeout: the reply wait is
    bounded by the runtime's reply timeout only."""
    make_ledger(postgres_url)
    c = agent_cluster(cluster, workers=1)
    runtime = DistributedAgentRuntime(c.settings, reply_timeout=60)
    model_client = OpenAIChatCompletionClient(model="sim-model", base_url=simulator.base_url, api_key="sim")
    await SimpleAgent.register(runtime, "simple_agent", lambda: SimpleAgent(model_client=model_client))
    runtime.start()
    started = time.monotonic()
    try:
        response = await runtime.send_message(
            Message("Slow, please [[delay 6]] [[say patience]]"), AgentId("simple_agent", "default")
        )
    finally:
        await runtime.stop()
        await model_client.close()
    assert isinstance(response, Message)
    assert "patience" in response.content
    assert time.monotonic() - started >= 6


async def test_a_killed_workers_agent_message_is_answered_by_another_within_30_s(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """SIGKILL of the worker running a handler, under the default lease and sweep settings: the
    sweeper sends the message again (Celery alone would wait out its visibility timeout) and
    another worker answers the caller, still waiting."""
    led = make_ledger(postgres_url)
    c = cluster()
    c.env["TOKENMILL_AGENT_MODULES"] = json.dumps([AGENT_MODULE])
    c.env["TOKENMILL_DEFAULT_MODEL"] = "sim-model"
    c.env["TOKENMILL_VISIBILITY_TIMEOUT_SECONDS"] = "3600"
    for name in ("LEASE_SECONDS", "SWEEP_INTERVAL_SECONDS", "SWEEP_GRACE_SECONDS"):
        c.env.pop(f"TOKENMILL_{name}")  # the defaults are what is promised
    victim = c.worker("victim", concurrency=4)
    c.beat()
    model_client = OpenAIChatCompletionClient(model="sim-model", base_url=simulator.base_url, api_key="sim")
    runtime = DistributedAgentRuntime(c.settings, reply_timeout=120)
    await SimpleAgent.register(runtime, "simple_agent", lambda: SimpleAgent(model_client=model_client))
    runtime.start()

    def holder() -> str | None:
        with led.engine.connect() as conn:
            return conn.execute(sa.select(AgentMessage.lease_owner)).scalar_one_or_none()

    try:
        reply = asyncio.ensure_future(
            runtime.send_message(
                Message("Take your time [[delay 4]] [[say done]]"), AgentId("simple_agent", "k")
            )
        )
        deadline = time.monotonic() + 60
        while not (holder() or "").startswith("victim@"):
            assert time.monotonic() < deadline
            assert not reply.done()
            await asyncio.sleep(0.1)
        c.worker("survivor", concurrency=4)
        kill_group(victim)
        killed_at = time.monotonic()
        while not (holder() or "").startswith("survivor@"):
            assert time.monotonic() - killed_at < 60, holder()
            await asyncio.sleep(0.1)
        running_again = time.monotonic() - killed_at
        response = await asyncio.wait_for(reply, 60)
    finally:
        await runtime.stop()
        await model_client.close()
    print(f"the agent message ran again {running_again:.1f} s after the kill")
    assert running_again <= 30
    assert isinstance(response, Message)
    assert "done" in response.content
    with led.engine.connect() as conn:
        row = conn.execute(sa.select(AgentMessage.attempts, AgentMessage.answered_at)).one()
    assert row.attempts == 2
    assert row.answered_at is not None


async def test_a_handler_blocking_its_loop_past_the_lease_keeps_its_message(
    cluster: Callable[..., Cluster],
    make_ledger: Callable[[str], Ledger],
    postgres_url: str,
    simulator: SimulatorServer,
) -> None:
    """A synchronous tool holds the worker's event loop for over two leases: the heartbeat (on a
    thread of its own) keeps the agent's lock and the message's lease, so the sweeper does not send
    the message again and no second worker runs the handler (and its tools' side effects)."""
    led = make_ledger(postgres_url)
    c = agent_cluster(cluster, workers=2)  # 5 s leases, a sweep every second
    c.beat()
    runtime = DistributedAgentRuntime(c.settings, reply_timeout=90)
    await BlockingAgent.register(runtime, "blocking_agent", BlockingAgent)
    runtime.start()
    try:
        reply = await runtime.send_message(Block(seconds=12), AgentId("blocking_agent", "k"))
    finally:
        await runtime.stop()
    assert reply == Block(seconds=12)
    with led.engine.connect() as conn:
        row = conn.execute(sa.select(AgentMessage.attempts, AgentMessage.answered_at)).one()
    assert row.attempts == 1
    assert row.answered_at is not None
