"""What every agent runtime offers, and how an agent learns its id and runtime while being built."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from agents.ids import AgentId, AgentType
from models.cancellation import CancellationToken

if TYPE_CHECKING:
    from agents.agent import AgentMetadata, BaseAgent

__all__ = ["AgentFactory", "AgentInstantiationContext", "AgentRuntime"]

AgentT = TypeVar("AgentT", bound="BaseAgent")

AgentFactory = Callable[[], "AgentT | Awaitable[AgentT]"]


class AgentRuntime(Protocol):
    """AutoGen's ``AgentRuntime``, the direct-messaging part: the local and the distributed runtime
    both implement it, so an agent's code does not know which one runs it."""

    async def send_message(
        self,
        message: Any,
        recipient: AgentId,
        *,
        sender: AgentId | None = None,
        cancellation_token: CancellationToken | None = None,
        message_id: str | None = None,
    ) -> Any:
        """Deliver ``message`` to ``recipient`` and return its handler's reply; the handler's
        exception, if any, is raised here."""
        ...

    async def register_factory(
        self,
        type: str | AgentType,
        agent_factory: Callable[[], AgentT | Awaitable[AgentT]],
        *,
        expected_class: type[AgentT] | None = None,
    ) -> AgentType: ...

    async def get(
        self, id_or_type: AgentId | AgentType | str, /, key: str = "default", *, lazy: bool = True
    ) -> AgentId: ...

    async def save_state(self) -> Mapping[str, Any]: ...

    async def load_state(self, state: Mapping[str, Any]) -> None: ...

    async def agent_save_state(self, agent: AgentId) -> Mapping[str, Any]: ...

    async def agent_load_state(self, agent: AgentId, state: Mapping[str, Any]) -> None: ...

    async def agent_metadata(self, agent: AgentId) -> AgentMetadata: ...


_current_runtime: ContextVar[AgentRuntime] = ContextVar("agent_runtime")
_current_agent_id: ContextVar[AgentId] = ContextVar("agent_id")


class AgentInstantiationContext:
    """Set by a runtime around an agent factory call, so ``BaseAgent.__init__`` finds its id and
    runtime without the factory passing them (AutoGen's mechanism: factories are ``lambda: A(...)``)."""

    @staticmethod
    @contextmanager
    def populate_context(runtime: AgentRuntime, agent_id: AgentId) -> Iterator[None]:
        runtime_token = _current_runtime.set(runtime)
        id_token = _current_agent_id.set(agent_id)
        try:
            yield
        finally:
            _current_agent_id.reset(id_token)
            _current_runtime.reset(runtime_token)

    @staticmethod
    def current_runtime() -> AgentRuntime:
        try:
            return _current_runtime.get()
        except LookupError as e:
            raise RuntimeError(
                "an agent can only be built by a runtime: register its factory and send it a message"
            ) from e

    @staticmethod
    def current_agent_id() -> AgentId:
        try:
            return _current_agent_id.get()
        except LookupError as e:
            raise RuntimeError(
                "an agent can only be built by a runtime: register its factory and send it a message"
            ) from e

    @staticmethod
    def is_in_factory_call() -> bool:
        return _current_agent_id.get(None) is not None
