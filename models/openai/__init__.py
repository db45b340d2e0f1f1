"""OpenAI-protocol clients (OpenAI, Azure OpenAI, Gemini, OpenAI-compatible servers) and the
conversions between OpenAI's JSON and tokenmill's types."""

from models.openai.client import (
    GEMINI_BASE_URL,
    AzureOpenAIChatCompletionClient,
    BaseOpenAIChatCompletionClient,
    OpenAIChatCompletionClient,
)
from models.openai.errors import from_openai_error
from models.openai.messages import (
    ToolSpec,
    messages_from_openai,
    to_openai_messages,
    to_openai_tool_choice,
    to_openai_tools,
)
from models.openai.model_info import PERMISSIVE_MODEL_INFO, resolve_model_info
from models.openai.requests import ChatRequest, request_from_openai_body
from models.openai.response_format import resolve_response_format, schema_response_format
from models.openai.results import StreamAccumulator, chat_completion_body, result_from_completion

__all__ = [
    "GEMINI_BASE_URL",
    "PERMISSIVE_MODEL_INFO",
    "AzureOpenAIChatCompletionClient",
    "BaseOpenAIChatCompletionClient",
    "ChatRequest",
    "OpenAIChatCompletionClient",
    "StreamAccumulator",
    "ToolSpec",
    "chat_completion_body",
    "from_openai_error",
    "messages_from_openai",
    "request_from_openai_body",
    "resolve_model_info",
    "resolve_response_format",
    "result_from_completion",
    "schema_response_format",
    "to_openai_messages",
    "to_openai_tool_choice",
    "to_openai_tools",
]
