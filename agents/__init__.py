"""tokenmill's agent model, with AutoGen's names so AutoGen examples run unchanged.

Agents (``RoutedAgent`` + ``@message_handler``) run on a runtime (``SingleThreadedAgentRuntime``
in this process; any ``AgentRuntime``). Model contexts decide what of a conversation the model
sees; tools are looked up by name in a registry; ``run_assistant`` is the ready-made tool-calling
assistant for declarative runs, which ``workers.agent_tasks`` runs on workers through their
model-call pipeline. For runtimes across processes (``workers.agent_runtime``), agent types are
registered by name (``agent_type``) in modules both sides import, and messages travel as JSON
(``default_message_types``).
"""

from agents.agent import AgentMetadata, BaseAgent
from agents.agent_runtime import AgentFactory, AgentInstantiationContext, AgentRuntime
from agents.agent_types import (
    AgentTypeRegistration,
    AgentTypeRegistry,
    agent_type,
    default_agent_types,
    load_agent_modules,
)
from agents.assistant import (
    AssistantConfig,
    AssistantRunResult,
    ModelCall,
    ModelCallRecord,
    ModelRequest,
    StopReason,
    client_model_call,
    run_assistant,
)
from agents.calculator import evaluate
from agents.exceptions import (
    AgentError,
    AgentReplyTimeout,
    AgentStateError,
    AssistantRunError,
    CalculatorError,
    CantHandleException,
    MessageSerializationError,
    RemoteAgentError,
    ToolArgumentsError,
    ToolError,
    UndeliverableException,
    UnknownToolError,
)
from agents.function_tool import FunctionTool, return_value_as_string
from agents.ids import AgentId, AgentType, TopicId
from agents.message_codec import MessageTypeRegistry, default_message_types, message_type_name
from agents.message_context import MessageContext
from agents.model_context import (
    BufferedChatCompletionContext,
    ChatCompletionContext,
    HeadAndTailChatCompletionContext,
    TokenLimitedChatCompletionContext,
    UnboundedChatCompletionContext,
    message_groups,
)
from agents.routed_agent import RoutedAgent, handler_message_types, message_handler
from agents.single_threaded_runtime import SingleThreadedAgentRuntime
from agents.tools import ToolRegistry, calculator, current_time, default_registry, load_tool_modules, tool
from models.cancellation import CancellationToken

Agent = BaseAgent
"""AutoGen spells the base class both ways."""

__all__ = [
    "Agent",
    "AgentError",
    "AgentFactory",
    "AgentId",
    "AgentInstantiationContext",
    "AgentMetadata",
    "AgentReplyTimeout",
    "AgentRuntime",
    "AgentStateError",
    "AgentType",
    "AgentTypeRegistration",
    "AgentTypeRegistry",
    "AssistantConfig",
    "AssistantRunError",
    "AssistantRunResult",
    "BaseAgent",
    "BufferedChatCompletionContext",
    "CalculatorError",
    "CancellationToken",
    "CantHandleException",
    "ChatCompletionContext",
    "FunctionTool",
    "HeadAndTailChatCompletionContext",
    "MessageContext",
    "MessageSerializationError",
    "MessageTypeRegistry",
    "ModelCall",
    "ModelCallRecord",
    "ModelRequest",
    "RemoteAgentError",
    "RoutedAgent",
    "SingleThreadedAgentRuntime",
    "StopReason",
    "TokenLimitedChatCompletionContext",
    "ToolArgumentsError",
    "ToolError",
    "ToolRegistry",
    "TopicId",
    "UnboundedChatCompletionContext",
    "UndeliverableException",
    "UnknownToolError",
    "agent_type",
    "calculator",
    "client_model_call",
    "current_time",
    "default_agent_types",
    "default_message_types",
    "default_registry",
    "evaluate",
    "handler_message_types",
    "load_agent_modules",
    "load_tool_modules",
    "message_groups",
    "message_handler",
    "message_type_name",
    "return_value_as_string",
    "run_assistant",
    "tool",
]
