"""Model contexts: what an agent remembers of a conversation, and which part of it the model sees.

Every context stores every message it is given; ``get_messages()`` returns the view sent to the
model. Views cut only between *groups*: an assistant message with tool calls and the tool results
that follow it form one group, and a group is kept or dropped whole, because OpenAI rejects a
``tool`` message that does not follow its assistant ``tool_calls`` (and an assistant ``tool_calls``
message whose results are missing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from agents.exceptions import AgentStateError
from models.base import ChatCompletionClient
from models.types import (
    AssistantMessage,
    FunctionExecutionResultMessage,
    LLMMessage,
    Tool,
    ToolSchema,
    UserMessage,
)

__all__ = [
    "BufferedChatCompletionContext",
    "ChatCompletionContext",
    "HeadAndTailChatCompletionContext",
    "TokenLimitedChatCompletionContext",
    "UnboundedChatCompletionContext",
    "message_groups",
]

_MESSAGES: TypeAdapter[list[LLMMessage]] = TypeAdapter(list[LLMMessage])


def _is_tool_call_group_start(message: LLMMessage) -> bool:
    return isinstance(message, AssistantMessage) and isinstance(message.content, list)


def message_groups(messages: Sequence[LLMMessage]) -> list[list[LLMMessage]]:
    """Split a conversation into groups that can be dropped independently.

    A tool-call assistant message and the result messages right after it are one group; every
    other message is a group of its own. Result messages with no tool-call message before them
    (a history cut elsewhere) are left out: no model accepts them.
    """
    groups: list[list[LLMMessage]] = []
    for message in messages:
        if isinstance(message, FunctionExecutionResultMessage):
            if groups and _is_tool_call_group_start(groups[-1][0]):
                groups[-1].append(message)
            continue
        groups.append([message])
    return groups


def _flatten(groups: Sequence[Sequence[LLMMessage]]) -> list[LLMMessage]:
    return [message for group in groups for message in group]


class ChatCompletionContext(ABC):
    """AutoGen's ``ChatCompletionContext``: ``add_message``, ``get_messages``, ``clear``,
    ``save_state``, ``load_state``. The state is a JSON-serializable dict."""

    def __init__(self, initial_messages: Sequence[LLMMessage] | None = None) -> None:
        self._messages: list[LLMMessage] = list(initial_messages or [])

    async def add_message(self, message: LLMMessage) -> None:
        self._messages.append(message)

    @abstractmethod
    async def get_messages(self) -> list[LLMMessage]:
        """The messages to send to the model."""

    async def clear(self) -> None:
        self._messages = []

    async def save_state(self) -> Mapping[str, Any]:
        return {"messages": _MESSAGES.dump_python(self._messages, mode="json")}

    async def load_state(self, state: Mapping[str, Any]) -> None:
        try:
            self._messages = _MESSAGES.validate_python(state.get("messages", []))
        except ValidationError as e:
            raise AgentStateError(f"invalid model context state: {e}") from e


class UnboundedChatCompletionContext(ChatCompletionContext):
    """Every message, every time (result messages left orphaned by an earlier cut excepted)."""

    async def get_messages(self) -> list[LLMMessage]:
        return _flatten(message_groups(self._messages))


class BufferedChatCompletionContext(ChatCompletionContext):
    """The last ``buffer_size`` messages, cut between groups. The newest group is always kept,
    even when it alone is longer than the buffer: the model needs the results of its last calls."""

    def __init__(self, buffer_size: int, initial_messages: Sequence[LLMMessage] | None = None) -> None:
        if buffer_size <= 0:
            raise ValueError("buffer_size must be greater than 0")
        super().__init__(initial_messages)
        self._buffer_size = buffer_size

    async def get_messages(self) -> list[LLMMessage]:
        kept: list[list[LLMMessage]] = []
        count = 0
        for group in reversed(message_groups(self._messages)):
            if kept and count + len(group) > self._buffer_size:
                break
            kept.append(group)
            count += len(group)
        kept.reverse()
        return _flatten(kept)


class HeadAndTailChatCompletionContext(ChatCompletionContext):
    """The first ``head_size`` and the last ``tail_size`` messages, cut between groups, with a
    placeholder user message saying how many were skipped in between (AutoGen's shape)."""

    def __init__(
        self, head_size: int, tail_size: int, initial_messages: Sequence[LLMMessage] | None = None
    ) -> None:
        if head_size < 0 or tail_size <= 0:
            raise ValueError("head_size must be >= 0 and tail_size > 0")
        super().__init__(initial_messages)
        self._head_size = head_size
        self._tail_size = tail_size

    async def get_messages(self) -> list[LLMMessage]:
        groups = message_groups(self._messages)
        head: list[list[LLMMessage]] = []
        count = 0
        for group in groups:
            if count + len(group) > self._head_size:
                break
            head.append(group)
            count += len(group)
        rest = groups[len(head) :]
        tail: list[list[LLMMessage]] = []
        count = 0
        for group in reversed(rest):
            if tail and count + len(group) > self._tail_size:
                break
            tail.append(group)
            count += len(group)
        tail.reverse()
        skipped = sum(len(group) for group in rest[: len(rest) - len(tail)])
        if skipped == 0:
            return _flatten(head + tail)
        placeholder = UserMessage(content=f"Skipped {skipped} messages.", source="System")
        return [*_flatten(head), placeholder, *_flatten(tail)]


class TokenLimitedChatCompletionContext(ChatCompletionContext):
    """As many messages as fit in ``token_limit`` tokens (by the client's ``count_tokens``), or, with
    no limit, in what the client's model has left (``remaining_tokens``). Whole groups are dropped
    from the middle, so the start of the conversation (the task) and its newest group stay."""

    def __init__(
        self,
        model_client: ChatCompletionClient,
        token_limit: int | None = None,
        tool_schema: Sequence[Tool | ToolSchema] | None = None,
        initial_messages: Sequence[LLMMessage] | None = None,
    ) -> None:
        if token_limit is not None and token_limit <= 0:
            raise ValueError("token_limit must be greater than 0")
        super().__init__(initial_messages)
        self._model_client = model_client
        self._token_limit = token_limit
        self._tool_schema = list(tool_schema or [])

    def _over_limit(self, messages: list[LLMMessage]) -> bool:
        if self._token_limit is None:
            return self._model_client.remaining_tokens(messages, tools=self._tool_schema) < 0
        return self._model_client.count_tokens(messages, tools=self._tool_schema) > self._token_limit

    async def get_messages(self) -> list[LLMMessage]:
        groups = message_groups(self._messages)
        while len(groups) > 1 and self._over_limit(_flatten(groups)):
            # The middle of what may be dropped: never the last group.
            groups.pop((len(groups) - 1) // 2)
        return _flatten(groups)
