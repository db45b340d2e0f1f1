"""A chat-completions request body (a batch line's ``body``) as arguments to ``create()``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from models.errors import BadRequest
from models.openai.messages import ToolSpec, messages_from_openai
from models.types import LLMMessage, ToolChoice, ToolSchema

__all__ = ["ChatRequest", "request_from_openai_body"]

# Keys that are not create arguments: ``model`` picks the client, ``stream``/``stream_options`` are
# how the answer travels (a batch never streams), the rest have fields of their own.
_NOT_CREATE_ARGS = frozenset(
    {"model", "messages", "tools", "tool_choice", "response_format", "stream", "stream_options"}
)


@dataclass(slots=True)
class ChatRequest:
    """Everything in a chat-completions body, split the way ``create()`` takes it."""

    model: str
    messages: list[LLMMessage]
    tools: list[ToolSchema] = field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    json_output: bool | None = None
    response_format: dict[str, Any] | None = None
    extra_create_args: dict[str, Any] = field(default_factory=dict)

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``client.create(request.messages, **request.create_kwargs())``."""
        extra = dict(self.extra_create_args)
        if self.response_format is not None:
            extra["response_format"] = self.response_format
        return {
            "tools": self.tools,
            "tool_choice": self.tool_choice,
            "json_output": self.json_output,
            "extra_create_args": extra,
        }


def _tool_choice(value: Any, tools: list[ToolSchema]) -> ToolChoice:
    if value is None:
        return "auto"
    if value in ("auto", "required", "none"):
        return value  # type: ignore[no-any-return]
    if isinstance(value, Mapping) and value.get("type") == "function":
        function = value.get("function")
        if not isinstance(function, Mapping):
            raise BadRequest("tool_choice.function must be an object", code="invalid_tool_choice")
        name = function.get("name")
        for tool in tools:
            if tool.get("name") == name:
                return ToolSpec(tool)
        raise BadRequest(
            f"tool_choice names {name!r}, which is not among the request's tools", code="invalid_tool"
        )
    raise BadRequest(f"unsupported tool_choice {value!r}", code="invalid_tool_choice")


def _tools(value: Any) -> list[ToolSchema] | None:
    """The body's tools as our schemas; None when some tool says more than a schema holds (a
    free-form "custom" tool, another type, a key beside ``type`` and ``function``): then the
    tools go to the provider as the caller wrote them, and the provider judges them."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest("tools must be a list", code="invalid_tools")
    tools: list[ToolSchema] = []
    verbatim = False
    for tool in value:
        if not isinstance(tool, Mapping) or not isinstance(tool.get("type"), str):
            raise BadRequest("each tool must be an object with a type", code="invalid_tools")
        if tool["type"] != "function":
            verbatim = True
            continue
        function = tool.get("function")
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise BadRequest("a function tool needs function.name", code="invalid_tools")
        verbatim = verbatim or tool.keys() != {"type", "function"}
        tools.append(ToolSchema(**function))  # type: ignore[typeddict-item]
    return None if verbatim else tools


# tool_choice values our ``ToolChoice`` says; any other (``allowed_tools``, a custom tool named)
# goes to the provider as written, with the tools.
_TYPED_CHOICES = frozenset({"auto", "required", "none"})


def _typed_choice(choice: Any) -> bool:
    """Whether our ``ToolChoice`` says ``choice`` (absent, a mode of its own, a function named)."""
    if choice is None or isinstance(choice, str):
        return choice is None or choice in _TYPED_CHOICES
    return isinstance(choice, Mapping) and choice.get("type") == "function"


# The status of a body refused here: the client's mistake, as the provider would answer it.
_BAD_BODY_STATUS = 400


def request_from_openai_body(body: Mapping[str, Any]) -> ChatRequest:
    """Split an OpenAI chat-completions body; every key that is not a message, tool or format
    (temperature, n, seed, max_tokens, logprobs, ...) lands in ``extra_create_args`` unchanged.
    ``stream`` and ``stream_options`` are dropped.

    Raises ``BadRequest`` (status 400) for any body it cannot read, whatever breaks on it: the
    body is the client's, so reading it again cannot succeed, and an error of another type would
    send its request back in line to break again on every delivery."""
    try:
        return _split(body)
    except BadRequest as e:
        if e.status_code is not None:
            raise
        raise BadRequest(e.message, code=e.code or "invalid_request", status_code=_BAD_BODY_STATUS) from e
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        # pydantic's ValidationError is a ValueError: a field of a message our types refuse.
        raise BadRequest(
            f"the body cannot be read: {e}", code="invalid_body", status_code=_BAD_BODY_STATUS
        ) from e


def _split(body: Mapping[str, Any]) -> ChatRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("the body has no model", code="invalid_request")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("the body has no messages", code="invalid_request")
    tools = _tools(body.get("tools"))
    choice = body.get("tool_choice")
    extra = {key: value for key, value in body.items() if key not in _NOT_CREATE_ARGS}
    if tools is None or not _typed_choice(choice):
        # What our types cannot say goes as written; the provider judges it, as it would have
        # without tokenmill between.
        extra.update({key: body[key] for key in ("tools", "tool_choice") if key in body})
        tools, choice = [], None
    elif choice == "auto":
        # Said, not left out: "auto" is OpenAI's default with tools, not every server's, and a
        # provider answering from the request it received (a cache, a seed) answers another one.
        extra["tool_choice"] = choice
    response_format = body.get("response_format")
    json_output: bool | None = None
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_object":
        json_output, response_format = True, None
    elif response_format is not None and not isinstance(response_format, Mapping):
        raise BadRequest("response_format must be an object", code="invalid_request")
    return ChatRequest(
        model=model,
        messages=messages_from_openai(messages),
        tools=tools,
        tool_choice=_tool_choice(choice, tools),
        json_output=json_output,
        response_format=dict(response_format) if response_format is not None else None,
        extra_create_args=extra,
    )
