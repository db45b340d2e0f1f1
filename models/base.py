"""The client protocol every model client (and the cache wrapping one) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from models.cancellation import CancellationToken
from models.types import CreateResult, LLMMessage, ModelInfo, RequestUsage, Tool, ToolChoice, ToolSchema

__all__ = ["ChatCompletionClient", "DelegatingClient"]


class ChatCompletionClient(ABC):
    """AutoGen's ``ChatCompletionClient`` shape.

    ``actual_usage()`` is what was spent upstream; ``total_usage()`` is what the returned results
    represent. They differ only for a cache: a hit moves ``total_usage()`` and never
    ``actual_usage()``.
    """

    @abstractmethod
    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult: ...

    @abstractmethod
    def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        """Yield ``str`` chunks, then exactly one ``CreateResult`` as the last item."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    def actual_usage(self) -> RequestUsage: ...

    @abstractmethod
    def total_usage(self) -> RequestUsage: ...

    @abstractmethod
    def count_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()
    ) -> int: ...

    @abstractmethod
    def remaining_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()
    ) -> int: ...

    @property
    @abstractmethod
    def model_info(self) -> ModelInfo: ...

    @property
    @abstractmethod
    def cache_identity(self) -> Mapping[str, Any]:
        """Everything about this client that changes an answer, and no secret: provider,
        endpoint, model, default create args (response_format as its JSON schema).
        ``ChatCompletionCache`` puts it in every key."""


class DelegatingClient(ChatCompletionClient):
    """A client wrapping another (a cache, a rate governor): what the wrapper does not change,
    it hands to the wrapped client. Subclasses implement ``create`` and ``create_stream`` (and
    usage, where they count it themselves)."""

    def __init__(self, client: ChatCompletionClient) -> None:
        self._client = client

    @property
    def client(self) -> ChatCompletionClient:
        return self._client

    async def close(self) -> None:
        await self._client.close()

    def actual_usage(self) -> RequestUsage:
        return self._client.actual_usage()

    def total_usage(self) -> RequestUsage:
        return self._client.total_usage()

    def count_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()) -> int:
        return self._client.count_tokens(messages, tools=tools)

    def remaining_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()
    ) -> int:
        return self._client.remaining_tokens(messages, tools=tools)

    @property
    def model_info(self) -> ModelInfo:
        return self._client.model_info

    @property
    def cache_identity(self) -> Mapping[str, Any]:
        return self._client.cache_identity
