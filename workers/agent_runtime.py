"""``DistributedAgentRuntime``: agents run on Celery workers, their state in SQL.

The same API as ``agents.SingleThreadedAgentRuntime`` (``register_factory`` / ``Agent.register``,
``start``, ``stop``, ``stop_when_idle``, ``send_message``), so an agent example runs unchanged but
for the runtime's class. What happens to one ``send_message(message, AgentId(type, key))``::

    producer: encode the message as {"type": "<module>.<Class>", "data": {...}}
              write it to SQL (agent_messages: id, tenant, agent id, sender, payload)
              send Celery task tokenmill.agent_message (agent id, tenant, message id: no content)
              BLPOP <key_prefix>agent_reply:<message id> (redis.asyncio), up to the timeout
    worker:   lock <key_prefix>agent_lock:<tenant>:<type>/<key>  (one handler per agent at a time)
              read the message and the agent's state from SQL; if the agent already answered this
              message id (a redelivery), reply from SQL without running the handler again;
              else claim the message in SQL (a lease, kept with the lock while the handler runs:
              the sweeper sends again a message whose worker died, see workers.sweeper)
              build the agent from its registered factory, with a model client from the worker's
              pipeline (cache -> limiter -> retry), load_state, run the handler, save_state back
              (with the message id and the reply, version-checked), then
              LPUSH the reply (or the handler's error) to the reply key, with a TTL, and mark
              the message answered

The caller's BLPOP connection has no socket timeout (redis-py's default 5 s would fail any handler
slower than that); the wait is bounded by the reply timeout alone.

The reply travels through Redis rather than Celery's result backend, which the workers keep off
(results go to SQL). Agent types are registered by name in modules both sides import
(``agents.agent_type``; workers import ``TOKENMILL_AGENT_MODULES``): the factory given to
``register_factory`` here is a producer's lambda and never leaves this process. The Celery message
names the message by id ("ledger first": ids, never content, in the broker and in Flower).

A handler on a worker that sends to another agent goes through this runtime too; it then holds
its worker process while it waits, so such chains need more worker processes than their depth.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import redis.asyncio as aioredis
from celery import Celery
from sqlalchemy.engine import Engine

from agents import (
    AgentId,
    AgentMetadata,
    AgentReplyTimeout,
    AgentStateError,
    AgentType,
    BaseAgent,
    CantHandleException,
    MessageSerializationError,
    MessageTypeRegistry,
    RemoteAgentError,
    UndeliverableException,
    default_agent_types,
    default_message_types,
)
from config import Settings, get_settings
from models.cancellation import CancellationToken
from store import load_agent_state, make_engine, record_agent_message, save_agent_state
from workers.constants import AGENT_MESSAGE_TASK, agent_reply_key

__all__ = [
    "DistributedAgentRuntime",
    "error_reply",
    "raise_for_reply",
]

REPLY_TTL_SECONDS = 3600
# Beyond the BLPOP's own timeout, how long its answer may take to arrive before the wait gives up.
REPLY_WAIT_MARGIN_SECONDS = 10.0

AgentT = TypeVar("AgentT", bound=BaseAgent)

# Exceptions a caller gets back as their own class; any other is a RemoteAgentError.
_REBUILT_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls
    for cls in (CantHandleException, UndeliverableException, AgentStateError, MessageSerializationError)
}


def error_reply(error: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": {"type": type(error).__name__, "message": str(error)}}


def raise_for_reply(reply: Mapping[str, Any], codec: MessageTypeRegistry) -> Any:
    """The reply's message, or its error raised."""
    if reply.get("ok"):
        message = reply.get("message")
        return None if message is None else codec.decode(message)
    error = reply.get("error") or {}
    error_type, text = str(error.get("type", "")), str(error.get("message", ""))
    rebuilt = _REBUILT_ERRORS.get(error_type)
    if rebuilt is not None:
        raise rebuilt(text)
    raise RemoteAgentError(f"{error_type}: {text}", error_type)


class DistributedAgentRuntime:
    """Agents on Celery workers (see the module docstring). ``settings`` name the broker (and the
    reply keys' prefix) and the database (for ``agent_save_state``/``agent_load_state``); agent
    state is kept per ``tenant_id``."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        tenant_id: str | None = None,
        celery: Celery | None = None,
        engine: Engine | None = None,
        reply_timeout: float | None = None,
        message_types: MessageTypeRegistry = default_message_types,
    ) -> None:
        self._settings = settings or get_settings()
        if self._settings.broker_url is None:
            raise UndeliverableException("the distributed runtime needs a broker (TOKENMILL_BROKER_URL)")
        self._tenant_id = tenant_id
        self._celery = celery
        self._owns_celery = celery is None
        self._reply_timeout = reply_timeout or self._settings.agent_reply_timeout_seconds
        self._codec = message_types
        self._types: dict[str, type[BaseAgent] | None] = {}
        self._redis: aioredis.Redis | None = None
        # A worker hands in its own app and engine; a producer's runtime makes (and disposes) its own.
        self._engine = engine
        self._owns_engine = engine is None
        self._started = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._contacted: set[AgentId] = set()

    # -- registration ------------------------------------------------------------------------------

    async def register_factory(
        self,
        type: str | AgentType,
        agent_factory: Callable[[], AgentT | Awaitable[AgentT]],
        *,
        expected_class: type[AgentT] | None = None,
    ) -> AgentType:
        """Record the type (its factory stays here: workers build agents from the factory registered
        under the same name by ``agents.agent_type``) and the message classes of ``expected_class``."""
        del agent_factory
        name = type.type if isinstance(type, AgentType) else type
        AgentId(name, "default")  # validates the name
        if name in self._types:
            raise ValueError(f"agent type {name!r} is already registered")
        self._types[name] = expected_class
        if expected_class is not None:
            self._codec.register_agent_class(expected_class)
        return AgentType(name)

    def _known(self, name: str) -> bool:
        return name in self._types or name in default_agent_types

    async def get(
        self, id_or_type: AgentId | AgentType | str, /, key: str = "default", *, lazy: bool = True
    ) -> AgentId:
        del lazy  # agents exist on workers, built per message
        agent_id = id_or_type if isinstance(id_or_type, AgentId) else AgentId(id_or_type, key)
        if not self._known(agent_id.type):
            raise UndeliverableException(f"no agent type {agent_id.type!r} is registered")
        return agent_id

    async def agent_metadata(self, agent: AgentId) -> AgentMetadata:
        registration = default_agent_types.get(agent.type)
        cls = registration.agent_class if registration is not None else self._types.get(agent.type)
        description = (cls.__doc__ or "").strip().split("\n")[0] if cls is not None else ""
        return AgentMetadata(type=agent.type, key=agent.key, description=description)

    # -- state (in SQL, where the workers keep it) ----------------------------------------------

    def _db(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self._settings.database_url)
        return self._engine

    async def agent_save_state(self, agent: AgentId) -> Mapping[str, Any]:
        state = await asyncio.to_thread(load_agent_state, self._db(), agent.type, agent.key, self._tenant_id)
        return state or {}

    async def agent_load_state(self, agent: AgentId, state: Mapping[str, Any]) -> None:
        await asyncio.to_thread(save_agent_state, self._db(), agent.type, agent.key, state, self._tenant_id)

    async def save_state(self) -> Mapping[str, Any]:
        """The state of every agent this runtime sent a message to, keyed by ``"type/key"``."""
        return {str(agent): dict(await self.agent_save_state(agent)) for agent in self._contacted}

    async def load_state(self, state: Mapping[str, Any]) -> None:
        for agent_id, agent_state in state.items():
            await self.agent_load_state(AgentId.from_str(agent_id), agent_state)

    # -- messages --------------------------------------------------------------------------------

    def _celery_app(self) -> Celery:
        if self._celery is None:
            from workers.app import make_celery

            self._celery = make_celery(self._settings)
        return self._celery

    def _reply_redis(self) -> aioredis.Redis:
        if self._redis is None:
            assert self._settings.broker_url is not None
            # No socket timeout (redis-py's default is 5 s): a BLPOP is silent until its reply
            # comes, for as long as the handler runs; ``send_message`` bounds the wait itself.
            self._redis = aioredis.Redis.from_url(self._settings.broker_url, socket_timeout=None)
        return self._redis

    def _record_and_send(
        self, recipient: AgentId, message_id: str, payload: dict[str, Any], sender: AgentId | None
    ) -> None:
        """ "Ledger first": the message in SQL, then a Celery message naming it."""
        record_agent_message(
            self._db(),
            message_id,
            agent_type=recipient.type,
            agent_key=recipient.key,
            payload=payload,
            sender=None if sender is None else str(sender),
            tenant_id=self._tenant_id,
        )
        self._celery_app().send_task(
            AGENT_MESSAGE_TASK,
            kwargs={
                "agent_type": recipient.type,
                "agent_key": recipient.key,
                "tenant_id": self._tenant_id,
                "message_id": message_id,
            },
        )

    async def send_message(
        self,
        message: Any,
        recipient: AgentId,
        *,
        sender: AgentId | None = None,
        cancellation_token: CancellationToken | None = None,
        message_id: str | None = None,
        reply_timeout: float | None = None,
    ) -> Any:
        """Run ``recipient``'s handler for ``message`` on a worker and return its reply; its
        exception is raised here (as its own class for the agent model's exceptions, else as
        ``RemoteAgentError``). ``AgentReplyTimeout`` after ``reply_timeout`` seconds (default: the
        runtime's); the cancellation token stops the wait, not the handler."""
        if not self._known(recipient.type):
            raise UndeliverableException(f"no agent type {recipient.type!r} is registered")
        payload = self._codec.encode(message)
        message_id = message_id or uuid.uuid4().hex
        prefix = self._settings.key_prefix
        self._in_flight += 1
        self._idle.clear()
        try:
            self._contacted.add(recipient)
            await asyncio.to_thread(self._record_and_send, recipient, message_id, payload, sender)
            wait = reply_timeout or self._reply_timeout
            blpop = asyncio.ensure_future(
                self._reply_redis().blpop([agent_reply_key(prefix, message_id)], wait)
            )
            if cancellation_token is not None:
                cancellation_token.link_future(blpop)
            # A connection that died silently must not hold the caller past its own timeout.
            try:
                async with asyncio.timeout(wait + REPLY_WAIT_MARGIN_SECONDS):
                    popped = await blpop
            except TimeoutError:
                popped = None
            if popped is None:
                raise AgentReplyTimeout(f"no reply from {recipient} within {wait:.0f} s", "timeout")
            return raise_for_reply(json.loads(popped[1]), self._codec)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        if self._started:
            raise RuntimeError("the runtime is already started")
        self._started = True

    async def stop(self) -> None:
        """Wait for the replies being awaited, then close the connections."""
        if not self._started:
            raise RuntimeError("the runtime is not started")
        await self._idle.wait()
        self._started = False
        await self.close()

    async def stop_when_idle(self) -> None:
        await self.stop()

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
        if self._engine is not None and self._owns_engine:
            self._engine.dispose()
            self._engine = None
        if self._celery is not None and self._owns_celery:
            self._celery.close()
            self._celery = None
