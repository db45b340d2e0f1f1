"""Exceptions of the agent model, one tree:

    AgentError
     ├── CantHandleException ........ the recipient has no handler for this message type
     ├── UndeliverableException ..... unknown agent type, or the runtime is stopped
     ├── AgentStateError ............ a saved state that cannot be loaded
 ├── MessageSerializationError .. a message that cannot cross processes: unregistered class,
 │                                 unserializable field, or a payload that fails its class
 ├── RemoteAgentError ........... a handler on another process raised; ``error_type`` names it
 │    └── AgentReplyTimeout ..... no reply within the timeout (also a TimeoutError)
     ├── ToolError
     │    ├── UnknownToolError ...... no tool of that name is registered
     │    ├── ToolArgumentsError .... arguments that are not JSON, or fail the tool's schema
     │    └── CalculatorError ....... an expression the calculator refuses (syntax, size, x/0)
     └── AssistantRunError .......... a model call of an assistant run failed; ``partial`` keeps
                                       what the run did before it

``CantHandleException`` and ``UndeliverableException`` keep AutoGen's names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agents.assistant import AssistantRunResult

__all__ = [
    "AgentError",
    "AgentReplyTimeout",
    "AgentStateError",
    "AssistantRunError",
    "CalculatorError",
    "CantHandleException",
    "MessageSerializationError",
    "RemoteAgentError",
    "ToolArgumentsError",
    "ToolError",
    "UndeliverableException",
    "UnknownToolError",
]


class AgentError(Exception):
    """Base of every error raised by ``agents``."""


class CantHandleException(AgentError):
    """The recipient agent has no handler for the message's type."""


class UndeliverableException(AgentError):
    """The message could not be delivered: unknown agent type, or a stopped runtime."""


class AgentStateError(AgentError):
    """A saved agent or model-context state that cannot be loaded."""


class MessageSerializationError(AgentError):
    """A message that cannot be written as JSON or read back into its class."""


class RemoteAgentError(AgentError):
    """A handler run by another process raised an exception this process cannot rebuild as its
    own class; ``error_type`` is that exception's class name."""

    def __init__(self, message: str, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


class AgentReplyTimeout(RemoteAgentError, TimeoutError):
    """The reply did not come back in time (the handler may still run, and may still finish)."""


class ToolError(AgentError):
    """A tool could not be found, called or run."""


class UnknownToolError(ToolError):
    """No tool of that name is registered."""


class ToolArgumentsError(ToolError):
    """The arguments a model wrote are not a JSON object, or fail the tool's schema."""


class CalculatorError(ToolError):
    """An expression the calculator refuses: bad syntax, a disallowed construct, a result too large,
    or a division by zero."""


class AssistantRunError(AgentError):
    """A model call of an assistant run failed after the model-call path gave up on it.

    ``partial`` holds the transcript and per-call usage up to the failure, so a caller still
    records what was spent.
    """

    def __init__(self, message: str, partial: AssistantRunResult) -> None:
        super().__init__(message)
        self.partial = partial
