"""The worker's side of ``DistributedAgentRuntime``: the Celery task ``tokenmill.agent_message``.

One message, named by id: lock the agent (Redis, so two workers never run one agent's handlers at
once), read the message and the agent's state from SQL, answer from SQL if this message id was
already answered (a redelivery), else build the agent from its registered factory with a model
client from the worker's pipeline (cache -> limiter -> retry), run the handler, save the state back
version-checked together with the message id and the reply, and push the reply to the caller's
Redis key. The message is claimed in SQL (a lease this worker extends while the handler runs,
with the agent's lock) and marked answered after: a worker killed mid-handler leaves an
unanswered message under an expired lease, which the sweeper sends again within seconds
(``workers.sweeper``); the redo's finished model calls are cache hits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import redis.asyncio as aioredis
from celery.signals import worker_process_init
from redis import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError
from sqlalchemy.engine import Engine

from agents import (
    AgentId,
    AgentInstantiationContext,
    BaseAgent,
    MessageContext,
    UndeliverableException,
    default_agent_types,
    default_message_types,
    load_agent_modules,
    load_tool_modules,
)
from config import Settings
from models.cancellation import CancellationToken
from store import (
    AgentStateConflict,
    StoredAgentMessage,
    StoredAgentState,
    answer_agent_message,
    claim_agent_message,
    extend_agent_message_lease,
    get_agent_message,
    get_agent_state,
    save_agent_state,
)
from workers import context
from workers.agent_runtime import (
    REPLY_TTL_SECONDS,
    DistributedAgentRuntime,
    error_reply,
)
from workers.app import app
from workers.constants import AGENT_MESSAGE_TASK, agent_lock_key, agent_reply_key
from workers.leases import Heartbeat, lease_owner

__all__ = ["agent_message", "handle_agent_message", "load_worker_modules"]

_logger = logging.getLogger(__name__)


def load_worker_modules(settings: Settings) -> None:
    """Import the user's tool and agent modules (idempotent: Python imports a module once)."""
    load_tool_modules(settings.tool_modules)
    load_agent_modules(settings.agent_modules)


@worker_process_init.connect  # type: ignore[untyped-decorator, unused-ignore]
def _load_modules_in_child(**_: Any) -> None:
    load_worker_modules(context.settings())


async def _run_handler(
    settings: Settings,
    agent_id: AgentId,
    tenant_id: str | None,
    message_id: str,
    sender: str | None,
    payload: dict[str, Any],
    state: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(reply, state after): the handler's reply or error; state is saved either way, as the local
    runtime keeps an agent's state after a handler raised."""
    registration = default_agent_types.get(agent_id.type)
    if registration is None:
        error = UndeliverableException(
            f"no agent type {agent_id.type!r} on this worker: add its module to TOKENMILL_AGENT_MODULES"
        )
        return error_reply(error), state or {}
    # The process's pipeline, on the process's loop: its connections outlive this one message.
    pipeline = context.pipeline()
    host = DistributedAgentRuntime(settings, tenant_id=tenant_id, celery=app, engine=context.engine())
    agent: BaseAgent | None = None
    try:
        client = pipeline.client_for(registration.model or settings.default_model, tenant_id=tenant_id)
        with AgentInstantiationContext.populate_context(host, agent_id):
            built = registration.factory(client)
            agent = await built if inspect.isawaitable(built) else built
        if state:
            await agent.load_state(state)
        ctx = MessageContext(
            sender=None if sender is None else AgentId.from_str(sender),
            topic_id=None,
            is_rpc=True,
            cancellation_token=CancellationToken(),
            message_id=message_id,
        )
        try:
            message = default_message_types.decode(payload)
            result = await agent.on_message(message, ctx)
            reply: dict[str, Any] = {"ok": True, "message": default_message_types.encode(result)}
        except Exception as e:  # the handler's error is the caller's to see
            reply = error_reply(e)
        return reply, dict(await agent.save_state())
    finally:
        if agent is not None:
            await agent.close()
        await host.close()


@contextlib.contextmanager
def _keep_held(settings: Settings, lock: Lock, name: str, extend_lease: Callable[[], bool]) -> Iterator[None]:
    """While a handler runs: keep the agent's lock and the message's lease, from a thread (a
    synchronous tool holding the loop past a lease must not let another worker run the message).
    The thread renews the lock with a client of its own, by the token the loop's lock holds."""
    client = Redis.from_url(settings.broker_url or "")
    held = client.lock(name, timeout=settings.lease_seconds, thread_local=False)
    held.local.token = lock.local.token

    def beat() -> None:
        try:
            held.reacquire()
        except LockError:
            _logger.exception("the agent lock %s was lost", name)
        if not extend_lease():
            _logger.error("the lease of agent message under lock %s was lost", name)

    heartbeat = Heartbeat(f"agent lock {name}", settings.lease_seconds / 4, beat)
    heartbeat.start()
    try:
        yield
    finally:
        heartbeat.stop()
        client.close()


async def handle_agent_message(
    settings: Settings,
    engine: Engine,
    *,
    agent_type: str,
    agent_key: str,
    tenant_id: str | None,
    message_id: str,
    owner: str | None = None,
) -> dict[str, Any] | None:
    """Run one message, read from SQL, to its reply (pushed to the caller's reply key) and return
    the reply; None when there was nothing to do (answered already, or another worker holds it).

    ``owner`` names this delivery in the message's lease. A message delivered more than
    ``max_attempts`` times (its handler keeps killing workers) is answered with an error."""
    agent_id = AgentId(agent_type, agent_key)
    owner = owner or lease_owner()
    redis = aioredis.Redis.from_url(settings.broker_url or "")
    try:
        # The lock lives ``lease_seconds`` (a killed worker's agent is free again soon); a live
        # handler keeps it, and the message's lease, for as long as it runs.
        lock = redis.lock(
            agent_lock_key(settings.key_prefix, tenant_id, agent_id),
            timeout=settings.lease_seconds,
            blocking_timeout=settings.agent_reply_timeout_seconds,
        )
        async with lock:
            stored = await asyncio.to_thread(get_agent_state, engine, agent_type, agent_key, tenant_id)
            message = await asyncio.to_thread(get_agent_message, engine, message_id, tenant_id)
            if stored is not None and stored.last_message_id == message_id and stored.last_reply is not None:
                reply = stored.last_reply  # a redelivery of a message already answered
            elif message is None or (message.agent_type, message.agent_key) != (agent_type, agent_key):
                reply = error_reply(
                    UndeliverableException(f"no message {message_id!r} for {agent_id} in the ledger")
                )
            else:
                deliveries = await asyncio.to_thread(
                    claim_agent_message, engine, message_id, tenant_id, owner, settings.lease_seconds
                )
                if deliveries is None:
                    return None  # answered before (not as the agent's last message), or held
                if deliveries > settings.max_attempts:
                    reply = error_reply(
                        UndeliverableException(
                            f"gave up on message {message_id!r} after {deliveries - 1} "
                            "deliveries that did not finish"
                        )
                    )
                else:
                    reply = await _run_and_save(
                        settings, engine, lock, owner, agent_id, tenant_id, message_id, message, stored
                    )
            await asyncio.to_thread(answer_agent_message, engine, message_id, tenant_id)
        key = agent_reply_key(settings.key_prefix, message_id)
        async with redis.pipeline(transaction=True) as pipe:
            pipe.lpush(key, json.dumps(reply))
            pipe.expire(key, REPLY_TTL_SECONDS)
            await pipe.execute()
        return reply
    finally:
        await redis.aclose()


async def _run_and_save(
    settings: Settings,
    engine: Engine,
    lock: Lock,
    owner: str,
    agent_id: AgentId,
    tenant_id: str | None,
    message_id: str,
    message: StoredAgentMessage,
    stored: StoredAgentState | None,
) -> dict[str, Any]:
    extend = functools.partial(
        extend_agent_message_lease, engine, message_id, tenant_id, owner, settings.lease_seconds
    )
    with _keep_held(settings, lock, agent_lock_key(settings.key_prefix, tenant_id, agent_id), extend):
        reply, state = await _run_handler(
            settings,
            agent_id,
            tenant_id,
            message_id,
            message.sender,
            message.payload,
            None if stored is None else stored.state,
        )
    try:
        await asyncio.to_thread(
            functools.partial(
                save_agent_state,
                engine,
                agent_id.type,
                agent_id.key,
                state,
                tenant_id,
                expected_version=0 if stored is None else stored.version,
                message_id=message_id,
                reply=reply,
            )
        )
    except AgentStateConflict as e:  # the lock expired under a slow handler
        reply = error_reply(e)
    return reply


@app.task(name=AGENT_MESSAGE_TASK, bind=True, ignore_result=True)  # type: ignore[untyped-decorator, unused-ignore]
def agent_message(
    self: Any,
    agent_type: str,
    agent_key: str,
    tenant_id: str | None,
    message_id: str,
) -> bool:
    """The Celery task: True when the handler replied, False when it raised (or there was nothing
    to do). It carries ids only; the message itself is in SQL (``store.record_agent_message``)."""
    settings = context.settings()  # its modules were loaded at worker_process_init
    owner = lease_owner(self.request.hostname)
    reply = context.run_in_loop(
        handle_agent_message(
            settings,
            context.engine(),
            agent_type=agent_type,
            agent_key=agent_key,
            tenant_id=tenant_id,
            message_id=message_id,
            owner=owner,
        )
    )
    return reply is not None and bool(reply.get("ok"))
