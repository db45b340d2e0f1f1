"""``BaseAgent``: an agent's identity, its runtime, and its state.

An agent's state is a JSON-serializable dict. By default it is the state of every model context
the agent holds as an attribute (``self._model_context = BufferedChatCompletionContext(5)``), so
an agent that keeps its memory in model contexts is persisted by the distributed runtime without
writing ``save_state``/``load_state``; agents with other state override both.
"""

from __future__ import annotations

import builtins
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypedDict, TypeVar

from agents.agent_runtime import AgentInstantiationContext, AgentRuntime
from agents.exceptions import AgentStateError
from agents.ids import AgentId, AgentType
from agents.message_context import MessageContext
from agents.model_context import ChatCompletionContext
from models.cancellation import CancellationToken

__all__ = ["AgentMetadata", "BaseAgent"]

AgentT = TypeVar("AgentT", bound="BaseAgent")


class AgentMetadata(TypedDict):
    type: str
    key: str
    description: str


class BaseAgent(ABC):
    """AutoGen's ``BaseAgent``. Built only by a runtime, through a registered factory."""

    def __init__(self, description: str) -> None:
        self._runtime: AgentRuntime = AgentInstantiationContext.current_runtime()
        self._id: AgentId = AgentInstantiationContext.current_agent_id()
        self._description = description

    @property
    def id(self) -> AgentId:
        return self._id

    @property
    def type(self) -> str:
        return self._id.type

    @property
    def runtime(self) -> AgentRuntime:
        return self._runtime

    @property
    def metadata(self) -> AgentMetadata:
        return AgentMetadata(type=self._id.type, key=self._id.key, description=self._description)

    async def on_message(self, message: Any, ctx: MessageContext) -> Any:
        """Called by the runtime for each message to this agent; returns the reply."""
        return await self.on_message_impl(message, ctx)

    @abstractmethod
    async def on_message_impl(self, message: Any, ctx: MessageContext) -> Any: ...

    async def send_message(
        self,
        message: Any,
        recipient: AgentId,
        *,
        cancellation_token: CancellationToken | None = None,
        message_id: str | None = None,
    ) -> Any:
        """Send a message to another agent from this one and return its reply."""
        return await self._runtime.send_message(
            message, recipient, sender=self._id, cancellation_token=cancellation_token, message_id=message_id
        )

    def _model_contexts(self) -> dict[str, ChatCompletionContext]:
        return {name: value for name, value in vars(self).items() if isinstance(value, ChatCompletionContext)}

    async def save_state(self) -> Mapping[str, Any]:
        """The agent's state as a JSON-serializable dict (default: its model contexts)."""
        return {
            "model_contexts": {name: await ctx.save_state() for name, ctx in self._model_contexts().items()}
        }

    async def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore what ``save_state`` returned."""
        contexts = self._model_contexts()
        for name, context_state in dict(state.get("model_contexts", {})).items():
            if name not in contexts:
                raise AgentStateError(f"{type(self).__name__} has no model context attribute {name!r}")
            await contexts[name].load_state(context_state)

    async def close(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Called when the runtime closes."""

    @classmethod
    async def register(
        cls: builtins.type[AgentT],
        runtime: AgentRuntime,
        type: str,
        factory: Callable[[], AgentT | Awaitable[AgentT]],
    ) -> AgentType:
        """Register ``factory`` under ``type`` with ``runtime``, checking it builds a ``cls``."""
        return await runtime.register_factory(type, factory, expected_class=cls)
