"""Our messages and tools to OpenAI's chat-completions JSON, and OpenAI messages back to ours.

The two directions round-trip exactly: ``to_openai_messages(messages_from_openai(m)) == m`` for
every message a chat-completions body may carry, because a message read from OpenAI's JSON that
our typed fields do not say in full keeps that JSON (``openai_message``) and is sent as it was:
``name`` on every role (AutoGen sends it, the default ones included; a system message's too), an
assistant's ``refusal`` and ``audio``, audio and file parts, a ``developer`` role, fields only some
OpenAI-compatible servers know. Our typed fields are a view of it (a ``developer`` message is a
``SystemMessage``; parts our types cannot express are left out of the view); a message whose typed
fields were changed after reading goes as those fields say. A message the typed fields say in full
keeps none (and the cache key it always had); messages built in code (AutoGen's shapes) are
written from their fields as before. Only what is
not a chat message at all (an unknown role, content that is neither text nor a list of typed
parts) raises ``BadRequest``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from pydantic import BaseModel

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
    "CUSTOM_TOOL",
    "ToolSpec",
    "messages_from_openai",
    "openai_tool_call",
    "to_openai_message",
    "to_openai_messages",
    "to_openai_tool_choice",
    "to_openai_tools",
    "tool_call_fields",
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


# OpenAI's free-form ("custom") tools: a call of one says ``custom: {name, input}`` where a
# function's says ``function: {name, arguments}``; our ``FunctionCall`` holds the input as its
# arguments.
CUSTOM_TOOL = "custom"


def tool_call_fields(kind: object) -> tuple[str, str]:
    """The keys of a tool call of type ``kind``: the object naming the tool, and its arguments'."""
    return ("custom", "input") if kind == CUSTOM_TOOL else ("function", "arguments")


def openai_tool_call(call: FunctionCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _tool_message(result: FunctionExecutionResult) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": result.call_id, "content": result.content}


def to_openai_message(message: LLMMessage, *, include_name: bool = True) -> list[dict[str, Any]]:
    """One of our messages as OpenAI message dicts (a function-result message becomes one
    ``tool`` message per result). A message read from OpenAI's JSON goes as it was read."""
    if isinstance(message, FunctionExecutionResultMessage):
        return [_verbatim(result, include_name) or _tool_message(result) for result in message.content]
    verbatim = _verbatim(message, include_name)
    if verbatim is not None:
        return [verbatim]
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


def _parts(content: list[Any], role: str) -> list[Mapping[str, Any]]:
    for part in content:
        if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
            _unsupported(f"a content part without a type in a {role} message")
    return content


def _text_of(content: Any, role: str) -> str:
    """The text of a message's content: a string, or its text parts joined (other parts, such as
    an assistant's ``refusal`` parts, travel in the verbatim message only)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in _parts(content, role)
            if part["type"] == "text" and isinstance(part.get("text"), str)
        )
    _unsupported(f"{role} content of type {type(content).__name__}")


def _user_content(content: Any) -> str | list[str | Image]:
    """Text and image parts as ours; parts our types cannot express (``input_audio``, ``file``,
    a provider's own) travel in the verbatim message only."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        _unsupported(f"user content of type {type(content).__name__}")
    parts: list[str | Image] = []
    for part in _parts(content, "user"):
        kind = part["type"]
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
    return parts


def _function_calls(tool_calls: Any) -> list[FunctionCall]:
    if not isinstance(tool_calls, list):
        _unsupported("tool_calls that are not a list")
    calls: list[FunctionCall] = []
    for call in tool_calls:
        if not isinstance(call, Mapping):
            _unsupported("a tool call that is not an object")
        kind = call.get("type", "function")
        field_name, arguments_name = tool_call_fields(kind)
        function = call.get(field_name)
        if kind not in ("function", CUSTOM_TOOL) or not isinstance(function, Mapping):
            _unsupported(f"a tool call of type {kind!r}")
        name, arguments = function.get("name", ""), function.get(arguments_name, "")
        calls.append(
            FunctionCall(
                id=str(call.get("id", "")),
                name=str(name),
                arguments=arguments if isinstance(arguments, str) else str(arguments),
            )
        )
    return calls


_ReadMessage = SystemMessage | UserMessage | AssistantMessage | FunctionExecutionResult


def _read_message(message: Mapping[str, Any], tool_names: Mapping[str, str]) -> _ReadMessage:
    """One OpenAI message as our typed fields (no ``openai_message`` yet); a ``tool`` or legacy
    ``function`` message is one ``FunctionExecutionResult``."""
    role = message.get("role")
    content = message.get("content")
    name = message.get("name")
    if role in ("system", "developer"):
        return SystemMessage(content=_text_of(content, str(role)))
    if role == "user":
        source = name if isinstance(name, str) and name else _DEFAULT_USER_SOURCE
        return UserMessage(content=_user_content(content), source=source)
    if role == "assistant":
        source = name if isinstance(name, str) and name else _DEFAULT_ASSISTANT_SOURCE
        tool_calls = message.get("tool_calls")
        legacy_call = message.get("function_call")
        if not tool_calls and isinstance(legacy_call, Mapping):
            tool_calls = [{"type": "function", "function": legacy_call}]
        if tool_calls:
            thought = None if content is None else _text_of(content, "assistant")
            return AssistantMessage(content=_function_calls(tool_calls), thought=thought, source=source)
        return AssistantMessage(content=_text_of(content, "assistant"), source=source)
    if role == "tool":
        call_id = str(message.get("tool_call_id", ""))
        return FunctionExecutionResult(
            content=_text_of(content, "tool"), name=tool_names.get(call_id, ""), call_id=call_id
        )
    if role == "function":  # the legacy role: the result of a ``function_call``, by name
        return FunctionExecutionResult(
            content=_text_of(content, "function"), name=str(name or ""), call_id=""
        )
    _unsupported(f"a message with role {role!r}")


# The typed fields a verbatim message must still agree with to be sent as it is.
_SAID: dict[type[BaseModel], tuple[str, ...]] = {
    SystemMessage: ("content",),
    UserMessage: ("content", "source"),
    AssistantMessage: ("content", "thought", "source"),
    FunctionExecutionResult: ("content", "call_id"),
}


def _verbatim(message: _ReadMessage, include_name: bool) -> dict[str, Any] | None:
    """The message as the provider's request had it, unless its typed fields were changed since
    it was read (a copy with other content then goes as its typed fields say)."""
    original = message.openai_message
    if original is None:
        return None
    try:
        read = _read_message(original, {})
    except BadRequest:
        return None
    if type(read) is not type(message) or any(
        getattr(read, field) != getattr(message, field) for field in _SAID[type(message)]
    ):
        return None
    if not include_name and "name" in original and original.get("role") != "function":
        return {key: value for key, value in original.items() if key != "name"}
    return original


def messages_from_openai(messages: Sequence[Mapping[str, Any]]) -> list[LLMMessage]:
    """OpenAI chat messages as ours, each keeping the message it was read from
    (``openai_message``), which is what ``to_openai_messages`` sends; consecutive ``tool``
    messages become one ``FunctionExecutionResultMessage``."""
    out: list[LLMMessage] = []
    tool_names: dict[str, str] = {}
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise BadRequest(f"messages[{index}] is not an object", code="invalid_message")
        read = _read_message(message, tool_names)
        written = (
            [_tool_message(read)] if isinstance(read, FunctionExecutionResult) else to_openai_message(read)
        )
        if written != [message]:
            # Something the typed fields do not say (a name equal to the role's default, a
            # system message's name, a refusal, audio, another spelling): kept, sent verbatim and
            # part of the cache key. A message they say in full keeps the key it always had.
            read.openai_message = copy.deepcopy(dict(message))
        if isinstance(read, FunctionExecutionResult):
            previous = out[-1] if out else None
            if isinstance(previous, FunctionExecutionResultMessage):
                previous.content.append(read)
            else:
                out.append(FunctionExecutionResultMessage(content=[read]))
            continue
        if isinstance(read, AssistantMessage) and not isinstance(read.content, str):
            tool_names.update((call.id, call.name) for call in read.content)
        out.append(read)
    return out
