"""Our messages and tools to OpenAI's chat-completions JSON, and OpenAI messages back to ours.

The two directions round-trip: ``to_openai_messages(messages_from_openai(m)) == m`` for every
message a chat-completions body may carry that our types can express, up to spellings the API
treats as equal (a ``developer`` message becomes a ``SystemMessage``; ``detail: "auto"`` and a
user's ``name`` of ``"user"`` are left out). What our types cannot express (audio or file parts,
the legacy ``function`` role) raises ``BadRequest`` instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from models.errors import BadRequest
from models.types import (
    AssistantMessage,
    FunctionCall,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    Image,
    LLMMessage,
    SystemMessage,
    Tool,
    ToolChoice,
    ToolSchema,
    UserMessage,
)

__all__ = [
    "ToolSpec",
    "messages_from_openai",
    "openai_tool_call",
    "to_openai_message",
    "to_openai_messages",
    "to_openai_tool_choice",
    "to_openai_tools",
    "tool_schema",
]

_DEFAULT_USER_SOURCE = "user"
_DEFAULT_ASSISTANT_SOURCE = "assistant"


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool known only by its schema (from a request body): it can be offered to a model and
    named in ``tool_choice``, but running it is the caller's business."""

    spec: ToolSchema

    @property
    def name(self) -> str:
        return self.spec["name"]

    @property
    def schema(self) -> ToolSchema:
        return self.spec

    async def run_json(self, args: Mapping[str, Any]) -> Any:
        raise TypeError(f"tool {self.name!r} came from a request body and has no implementation to run")


def _image_part(image: Image) -> dict[str, Any]:
    image_url: dict[str, Any] = {"url": image.url}
    if image.detail != "auto":
        image_url["detail"] = image.detail
    return {"type": "image_url", "image_url": image_url}


def openai_tool_call(call: FunctionCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def to_openai_message(message: LLMMessage, *, include_name: bool = True) -> list[dict[str, Any]]:
    """One of our messages as OpenAI message dicts (a function-result message becomes one
    ``tool`` message per result)."""
    if isinstance(message, UserMessage):
        content = message.content
        out: dict[str, Any] = {"role": "user"}
        if isinstance(content, str):
            out["content"] = content
        else:
            out["content"] = [
                {"type": "text", "text": part} if isinstance(part, str) else _image_part(part)
                for part in content
            ]
        if include_name and message.source and message.source != _DEFAULT_USER_SOURCE:
            out["name"] = message.source
        return [out]
    if isinstance(message, SystemMessage):
        return [{"role": "system", "content": message.content}]
    if isinstance(message, AssistantMessage):
        out = {"role": "assistant"}
        if isinstance(message.content, str):
            out["content"] = message.content
        else:
            # Text the model wrote beside its tool calls travels as the message content.
            if message.thought is not None:
                out["content"] = message.thought
            out["tool_calls"] = [openai_tool_call(call) for call in message.content]
        if include_name and message.source and message.source != _DEFAULT_ASSISTANT_SOURCE:
            out["name"] = message.source
        return [out]
    if isinstance(message, FunctionExecutionResultMessage):
        return [
            {"role": "tool", "tool_call_id": result.call_id, "content": result.content}
            for result in message.content
        ]
    raise TypeError(f"not a message: {type(message).__name__}")


def to_openai_messages(messages: Sequence[LLMMessage], *, include_name: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in messages:
        out.extend(to_openai_message(message, include_name=include_name))
    return out


def tool_schema(tool: Tool | ToolSchema) -> ToolSchema:
    # A ToolSchema is a plain dict; checking that first avoids the slow runtime Protocol check.
    if isinstance(tool, dict):
        return tool
    return tool.schema


def to_openai_tools(tools: Sequence[Tool | ToolSchema]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in tools:
        schema = tool_schema(tool)
        if "name" not in schema:
            raise BadRequest("a tool schema needs a name")
        out.append({"type": "function", "function": dict(schema)})
    return out


def to_openai_tool_choice(tool_choice: ToolChoice, tools: Sequence[Tool | ToolSchema]) -> Any:
    """OpenAI's ``tool_choice``, or None to leave it out ("auto" is the API's default)."""
    if isinstance(tool_choice, str):
        if tool_choice == "auto":
            return None
        if tool_choice in ("required", "none"):
            return tool_choice
        raise BadRequest(f"tool_choice must be 'auto', 'required', 'none' or a tool, not {tool_choice!r}")
    name = tool_choice.name
    if not any(tool_schema(tool).get("name") == name for tool in tools):
        raise BadRequest(f"tool_choice names tool {name!r}, which is not among the tools offered")
    return {"type": "function", "function": {"name": name}}


# --- OpenAI dicts to our messages --------------------------------------------------------------


def _unsupported(what: str) -> NoReturn:
    raise BadRequest(f"cannot represent {what} in tokenmill's message types", code="unsupported_message")


def _text_of(content: Any, role: str) -> str:
    """A system/developer/tool message's content, a string or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                _unsupported(f"a non-text content part in a {role} message")
            texts.append(part["text"])
        return "".join(texts)
    _unsupported(f"{role} content of type {type(content).__name__}")


def _user_content(content: Any) -> str | list[str | Image]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        _unsupported(f"user content of type {type(content).__name__}")
    parts: list[str | Image] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            if isinstance(image, str):
                parts.append(Image(url=image))
            elif isinstance(image, Mapping) and isinstance(image.get("url"), str):
                parts.append(Image(url=image["url"], detail=image.get("detail") or "auto"))
            else:
                _unsupported("an image_url part without a url")
        else:
            _unsupported(f"a user content part of type {kind!r}")
    return parts


def _function_calls(tool_calls: Any) -> list[FunctionCall]:
    calls: list[FunctionCall] = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping) or call.get("type", "function") != "function":
            _unsupported("a tool call that is not a function call")
        arguments = function.get("arguments", "")
        calls.append(
            FunctionCall(
                id=str(call.get("id", "")),
                name=str(function.get("name", "")),
                arguments=arguments if isinstance(arguments, str) else str(arguments),
            )
        )
    return calls


def messages_from_openai(messages: Sequence[Mapping[str, Any]]) -> list[LLMMessage]:
    """OpenAI chat messages as ours; consecutive ``tool`` messages become one
    ``FunctionExecutionResultMessage``."""
    out: list[LLMMessage] = []
    tool_names: dict[str, str] = {}
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequest(f"messages[{index}] is not an object", code="invalid_message")
        role = message.get("role")
        content = message.get("content")
        name = message.get("name")
        if role in ("system", "developer"):
            out.append(SystemMessage(content=_text_of(content, str(role))))
        elif role == "user":
            source = name if isinstance(name, str) and name else _DEFAULT_USER_SOURCE
            out.append(UserMessage(content=_user_content(content), source=source))
        elif role == "assistant":
            source = name if isinstance(name, str) and name else _DEFAULT_ASSISTANT_SOURCE
            tool_calls = message.get("tool_calls")
            if tool_calls:
                calls = _function_calls(tool_calls)
                tool_names.update((call.id, call.name) for call in calls)
                thought = None if content is None else _text_of(content, "assistant")
                out.append(AssistantMessage(content=calls, thought=thought, source=source))
            else:
                out.append(AssistantMessage(content=_text_of(content, "assistant"), source=source))
        elif role == "tool":
            call_id = str(message.get("tool_call_id", ""))
            result = FunctionExecutionResult(
                content=_text_of(content, "tool"), name=tool_names.get(call_id, ""), call_id=call_id
            )
            previous = out[-1] if out else None
            if isinstance(previous, FunctionExecutionResultMessage):
                previous.content.append(result)
            else:
                out.append(FunctionExecutionResultMessage(content=[result]))
        else:
            _unsupported(f"a message with role {role!r}")
    return out
