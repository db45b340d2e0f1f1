"""Message, tool and result types of the model-client layer (AutoGen's shapes, kept)."""

from __future__ import annotations

import base64
import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypedDict, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AssistantMessage",
    "ChatCompletionTokenLogprob",
    "CreateResult",
    "FinishReasons",
    "FunctionCall",
    "FunctionExecutionResult",
    "FunctionExecutionResultMessage",
    "Image",
    "LLMMessage",
    "ModelFamily",
    "ModelInfo",
    "RequestUsage",
    "SystemMessage",
    "Tool",
    "ToolChoice",
    "ToolSchema",
    "TopLogprob",
    "UserMessage",
]


class Image(BaseModel):
    """An image part of a user message, sent as a URL (``https://`` or a ``data:`` URI)."""

    model_config = ConfigDict(frozen=True)

    url: str
    detail: Literal["auto", "low", "high"] = "auto"

    @classmethod
    def from_bytes(cls, data: bytes, mime_type: str = "image/png") -> Image:
        return cls(url=f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}")

    @classmethod
    def from_file(cls, path: str | Path) -> Image:
        mime_type = mimetypes.guess_type(str(path))[0] or "image/png"
        return cls.from_bytes(Path(path).read_bytes(), mime_type)

    @classmethod
    def from_url(cls, url: str) -> Image:
        return cls(url=url)


class FunctionCall(BaseModel):
    """A tool call the model asked for; ``arguments`` is the JSON string the model wrote."""

    id: str
    name: str
    arguments: str


# The OpenAI message a message was read from (``models.openai.messages_from_openai``), sent to the
# provider verbatim while the typed fields still say what it says: every field the provider accepts
# (``name`` on any role, ``refusal``, ``audio``, audio and file parts, fields of OpenAI-compatible
# servers) reaches it unchanged, and the cache key covers them. None for messages built in code.


class FunctionExecutionResult(BaseModel):
    """The outcome of running one ``FunctionCall``, sent back to the model."""

    content: str
    name: str
    call_id: str
    is_error: bool | None = None
    openai_message: dict[str, Any] | None = Field(default=None, repr=False)


class SystemMessage(BaseModel):
    content: str
    type: Literal["SystemMessage"] = "SystemMessage"
    openai_message: dict[str, Any] | None = Field(default=None, repr=False)


class UserMessage(BaseModel):
    content: str | list[str | Image]
    source: str = "user"
    type: Literal["UserMessage"] = "UserMessage"
    openai_message: dict[str, Any] | None = Field(default=None, repr=False)


class AssistantMessage(BaseModel):
    content: str | list[FunctionCall]
    thought: str | None = None
    source: str = "assistant"
    type: Literal["AssistantMessage"] = "AssistantMessage"
    openai_message: dict[str, Any] | None = Field(default=None, repr=False)


class FunctionExecutionResultMessage(BaseModel):
    content: list[FunctionExecutionResult]
    type: Literal["FunctionExecutionResultMessage"] = "FunctionExecutionResultMessage"


LLMMessage = Annotated[
    SystemMessage | UserMessage | AssistantMessage | FunctionExecutionResultMessage,
    Field(discriminator="type"),
]

FinishReasons = Literal["stop", "length", "function_calls", "content_filter", "unknown"]


class RequestUsage(BaseModel):
    """Tokens of one call. ``cached_prompt_tokens`` and ``reasoning_tokens`` are parts of
    ``prompt_tokens`` and ``completion_tokens`` respectively, as the provider reports them."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0

    def __add__(self, other: RequestUsage) -> RequestUsage:
        return RequestUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens + other.cached_prompt_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class TopLogprob(BaseModel):
    logprob: float
    bytes: list[int] | None = None


class ChatCompletionTokenLogprob(BaseModel):
    token: str
    logprob: float
    top_logprobs: list[TopLogprob] | None = None
    bytes: list[int] | None = None


class CreateResult(BaseModel):
    """One completion. ``raw_response`` is the provider's JSON body, kept so a batch output line
    carries exactly what the provider answered (a text sent as content parts joined into a string:
    ``models.openai.results.NON_TEXT_PARTS``); ``model`` is the model that actually answered."""

    finish_reason: FinishReasons
    content: str | list[FunctionCall]
    usage: RequestUsage
    cached: bool
    logprobs: list[ChatCompletionTokenLogprob] | None = None
    thought: str | None = None
    model: str | None = None
    response_id: str | None = None
    raw_response: dict[str, Any] | None = Field(default=None, repr=False)


class ModelFamily:
    """Known model families (strings, so unknown ones pass through)."""

    GPT_4O = "gpt-4o"
    GPT_41 = "gpt-41"
    GPT_5 = "gpt-5"
    O1 = "o1"
    O3 = "o3"
    O4 = "o4"
    GEMINI_1_5_FLASH = "gemini-1.5-flash"
    GEMINI_1_5_PRO = "gemini-1.5-pro"
    GEMINI_2_0_FLASH = "gemini-2.0-flash"
    GEMINI_2_5_FLASH = "gemini-2.5-flash"
    GEMINI_2_5_PRO = "gemini-2.5-pro"
    UNKNOWN = "unknown"


class ModelInfo(TypedDict, total=False):
    """What a model can do. ``vision``, ``function_calling``, ``json_output`` and ``family`` are
    the keys AutoGen requires; ``structured_output`` and ``context_window`` are optional."""

    vision: bool
    function_calling: bool
    json_output: bool
    structured_output: bool
    family: str
    context_window: int


class ToolSchema(TypedDict, total=False):
    """A function tool as the model sees it (OpenAI's ``function`` object)."""

    name: str
    description: str
    parameters: dict[str, Any]
    strict: bool


@runtime_checkable
class Tool(Protocol):
    """Anything with a name and a schema can be offered to a model; agents also run it."""

    @property
    def name(self) -> str: ...

    @property
    def schema(self) -> ToolSchema: ...

    async def run_json(self, args: Mapping[str, Any]) -> Any: ...


ToolChoice = Tool | Literal["auto", "required", "none"]
