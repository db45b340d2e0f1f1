"""``SingleThreadedAgentRuntime``: agents in this process, on this event loop (scripts and tests).

Messages go through one queue; ``start()`` runs a loop that hands each to its recipient in a task
of its own, so a handler awaiting a model call does not hold up other agents. One agent instance
handles one message at a time (its model context would interleave otherwise); a handler that
sends, directly or through others, a message back to its own agent is let through, because
waiting for itself would never end.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agents.agent import AgentMetadata, BaseAgent
from agents.agent_runtime import AgentInstantiationContext
from agents.exceptions import UndeliverableException
from agents.ids import AgentId, AgentType
from agents.message_context import MessageContext
from models.cancellation import CancellationToken

__all__ = ["SingleThreadedAgentRuntime"]

AgentT = TypeVar("AgentT", bound=BaseAgent)

# The agents whose handlers are on the current call path, for the re-entrancy rule above.
_handling: ContextVar[tuple[AgentId, ...]] = ContextVar("agents_handling", default=())


@dataclass
class _Envelope:
    message: Any
    recipient: AgentId
    sender: AgentId | None
    future: asyncio.Future[Any]
    cancellation_token: CancellationToken
    message_id: str
    call_path: tuple[AgentId, ...] = field(default_factory=tuple)


class SingleThreadedAgentRuntime:
    """AutoGen's ``SingleThreadedAgentRuntime`` (direct messages): ``register_factory`` /
    ``Agent.register``, ``start``, ``stop``, ``stop_when_idle``, ``send_message`` (returns the
    handler's reply; the handler's exception is raised to the caller), and agent state."""

    def __init__(self) -> None:
        self._factories: dict[str, tuple[Callable[[], Any], type | None]] = {}
        self._instances: dict[AgentId, BaseAgent] = {}
        self._locks: dict[AgentId, asyncio.Lock] = {}
        self._queue: asyncio.Queue[_Envelope] = asyncio.Queue()
        self._loop_task: asyncio.Task[None] | None = None
        self._handling_tasks: set[asyncio.Task[None]] = set()

    # -- registration and instances ------------------------------------------------------------

    async def register_factory(
        self,
        type: str | AgentType,
        agent_factory: Callable[[], AgentT | Awaitable[AgentT]],
        *,
        expected_class: type[AgentT] | None = None,
    ) -> AgentType:
        name = type.type if isinstance(type, AgentType) else type
        AgentId(name, "default")  # validates the name
        if name in self._factories:
            raise ValueError(f"agent type {name!r} is already registered")
        self._factories[name] = (agent_factory, expected_class)
        return AgentType(name)

    async def _instance(self, agent_id: AgentId) -> BaseAgent:
        agent = self._instances.get(agent_id)
        if agent is not None:
            return agent
        if agent_id.type not in self._factories:
            raise UndeliverableException(f"no agent type {agent_id.type!r} is registered")
        factory, expected_class = self._factories[agent_id.type]
        with AgentInstantiationContext.populate_context(self, agent_id):
            built = factory()
            if inspect.isawaitable(built):
                built = await built
        if not isinstance(built, BaseAgent):
            raise TypeError(f"the factory of {agent_id.type!r} returned {built!r}, not an agent")
        if expected_class is not None and not isinstance(built, expected_class):
            raise TypeError(
                f"the factory of {agent_id.type!r} built a {type(built).__name__}, "
                f"not a {expected_class.__name__}"
            )
        # Another message may have built it while this factory awaited: keep the first.
        return self._instances.setdefault(agent_id, built)

    async def get(
        self, id_or_type: AgentId | AgentType | str, /, key: str = "default", *, lazy: bool = True
    ) -> AgentId:
        agent_id = id_or_type if isinstance(id_or_type, AgentId) else AgentId(id_or_type, key)
        if not lazy:
            await self._instance(agent_id)
        elif agent_id.type not in self._factories:
            raise UndeliverableException(f"no agent type {agent_id.type!r} is registered")
        return agent_id

    async def try_get_underlying_agent_instance(self, id: AgentId, type: type[AgentT] = BaseAgent) -> AgentT:  # type: ignore[assignment]
        agent = await self._instance(id)
        if not isinstance(agent, type):
            raise TypeError(f"{id} is a {agent.__class__.__name__}, not a {type.__name__}")
        return agent

    async def agent_metadata(self, agent: AgentId) -> AgentMetadata:
        return (await self._instance(agent)).metadata

    # -- state -----------------------------------------------------------------------------------

    async def agent_save_state(self, agent: AgentId) -> Mapping[str, Any]:
        return await (await self._instance(agent)).save_state()

    async def agent_load_state(self, agent: AgentId, state: Mapping[str, Any]) -> None:
        await (await self._instance(agent)).load_state(state)

    async def save_state(self) -> Mapping[str, Any]:
        """Every instantiated agent's state, keyed by ``"type/key"``."""
        return {str(agent_id): dict(await agent.save_state()) for agent_id, agent in self._instances.items()}

    async def load_state(self, state: Mapping[str, Any]) -> None:
        for agent_id, agent_state in state.items():
            await self.agent_load_state(AgentId.from_str(agent_id), agent_state)

    # -- messages --------------------------------------------------------------------------------

    async def send_message(
        self,
        message: Any,
        recipient: AgentId,
        *,
        sender: AgentId | None = None,
        cancellation_token: CancellationToken | None = None,
        message_id: str | None = None,
    ) -> Any:
        if recipient.type not in self._factories:
            raise UndeliverableException(f"no agent type {recipient.type!r} is registered")
        token = cancellation_token or CancellationToken()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        token.link_future(future)
        await self._queue.put(
            _Envelope(
                message, recipient, sender, future, token, message_id or str(uuid.uuid4()), _handling.get()
            )
        )
        return await future

    async def _deliver(self, envelope: _Envelope) -> None:
        future = envelope.future
        try:
            if future.done():  # cancelled while queued
                return
            agent = await self._instance(envelope.recipient)
            ctx = MessageContext(
                sender=envelope.sender,
                topic_id=None,
                is_rpc=True,
                cancellation_token=envelope.cancellation_token,
                message_id=envelope.message_id,
            )
            reentrant = envelope.recipient in envelope.call_path
            lock = self._locks.setdefault(envelope.recipient, asyncio.Lock())
            if reentrant:
                await self._run_handler(agent, envelope, ctx)
            else:
                async with lock:
                    await self._run_handler(agent, envelope, ctx)
        except Exception as e:
            if not future.done():
                future.set_exception(e)
        finally:
            self._queue.task_done()

    async def _run_handler(self, agent: BaseAgent, envelope: _Envelope, ctx: MessageContext) -> None:
        future = envelope.future
        if future.done():
            return
        _handling.set((*envelope.call_path, envelope.recipient))
        handler = asyncio.ensure_future(agent.on_message(envelope.message, ctx))
        # The sender giving up (its token, or its own task being cancelled) stops the handler.
        future.add_done_callback(lambda done: handler.cancel() if done.cancelled() else None)
        try:
            result = await handler
        except asyncio.CancelledError:
            if not future.done():
                future.cancel()
            return
        if not future.done():
            future.set_result(result)

    async def _run(self) -> None:
        while True:
            envelope = await self._queue.get()
            task = asyncio.create_task(self._deliver(envelope))
            self._handling_tasks.add(task)
            task.add_done_callback(self._handling_tasks.discard)

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start delivering messages (call from a running event loop)."""
        if self._loop_task is not None:
            raise RuntimeError("the runtime is already started")
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _stop_loop(self) -> None:
        if self._loop_task is None:
            raise RuntimeError("the runtime is not started")
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task
        self._loop_task = None

    async def stop(self) -> None:
        """Stop taking messages from the queue; handlers already running finish first. Messages
        still queued stay there for a later ``start()``."""
        await self._stop_loop()
        if self._handling_tasks:
            await asyncio.gather(*self._handling_tasks, return_exceptions=True)

    async def stop_when_idle(self) -> None:
        """Wait until every queued message is handled (including those handlers send), then stop."""
        await self._queue.join()
        await self._stop_loop()

    async def close(self) -> None:
        """Stop if running, then close every agent."""
        if self._loop_task is not None:
            await self.stop()
        for agent in self._instances.values():
            await agent.close()
