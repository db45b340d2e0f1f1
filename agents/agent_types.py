"""Agent types by name, for runtimes whose agents are built in another process.

A distributed runtime cannot ship a producer's factory (a lambda over the producer's model
client) to a worker. Instead, a module both sides import registers each agent type by name with a
factory that takes the model client the *worker* provides (its cache -> limiter -> retry path)::

    @agent_type("simple_agent", SimpleAgent)
    def simple_agent(model_client: ChatCompletionClient) -> SimpleAgent:
        return SimpleAgent(model_client=model_client)

Workers import the modules named in ``TOKENMILL_AGENT_MODULES`` (``load_agent_modules``).
Registering a type also registers the message classes its handlers take and return, so the
runtime can carry them as JSON.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from agents.agent import BaseAgent
from agents.exceptions import AgentError
from agents.ids import AgentId
from agents.message_codec import MessageTypeRegistry, default_message_types
from models.base import ChatCompletionClient

__all__ = [
    "AgentTypeRegistration",
    "AgentTypeRegistry",
    "agent_type",
    "default_agent_types",
    "load_agent_modules",
]

AgentT = TypeVar("AgentT", bound=BaseAgent)
ClientAgentFactory = Callable[[ChatCompletionClient], "BaseAgent | Awaitable[BaseAgent]"]


@dataclass(frozen=True)
class AgentTypeRegistration:
    name: str
    agent_class: type[BaseAgent]
    factory: ClientAgentFactory
    model: str | None
    """The model of the client the worker passes to ``factory`` (None: the default model)."""


class AgentTypeRegistry:
    """Agent types by name; registering a name twice with another factory is an error."""

    def __init__(self, message_types: MessageTypeRegistry = default_message_types) -> None:
        self._types: dict[str, AgentTypeRegistration] = {}
        self.message_types = message_types

    def register(
        self,
        name: str,
        agent_class: type[BaseAgent],
        factory: ClientAgentFactory,
        *,
        model: str | None = None,
    ) -> AgentTypeRegistration:
        AgentId(name, "default")  # validates the name
        known = self._types.get(name)
        if known is not None and known.factory is not factory:
            raise ValueError(f"agent type {name!r} is already registered")
        registration = AgentTypeRegistration(name, agent_class, factory, model)
        self._types[name] = registration
        self.message_types.register_agent_class(agent_class)
        return registration

    def get(self, name: str) -> AgentTypeRegistration | None:
        return self._types.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._types

    def names(self) -> list[str]:
        return sorted(self._types)


default_agent_types = AgentTypeRegistry()


def agent_type(
    name: str, agent_class: type[AgentT], *, model: str | None = None
) -> Callable[
    [Callable[[ChatCompletionClient], AgentT | Awaitable[AgentT]]],
    Callable[[ChatCompletionClient], AgentT | Awaitable[AgentT]],
]:
    """Decorator: register the decorated ``factory(model_client)`` as agent type ``name`` in
    ``default_agent_types``; returns the factory unchanged."""

    def decorate(
        factory: Callable[[ChatCompletionClient], AgentT | Awaitable[AgentT]],
    ) -> Callable[[ChatCompletionClient], AgentT | Awaitable[AgentT]]:
        default_agent_types.register(name, agent_class, factory, model=model)
        return factory

    return decorate


def load_agent_modules(module_names: Iterable[str]) -> None:
    """Import the modules that register agent types (``Settings.agent_modules``); importing twice
    registers nothing twice."""
    for module_name in module_names:
        try:
            importlib.import_module(module_name)
        except ImportError as e:
            raise AgentError(f"cannot import agent module {module_name!r}: {e}") from e
