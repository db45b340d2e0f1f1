"""A client that answers from a script, for tests and demos that must not call a model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from pydantic import BaseModel

from models.base import ChatCompletionClient
from models.cancellation import CancellationToken
from models.openai.model_info import PERMISSIVE_MODEL_INFO
from models.tokens import count_text_tokens, estimate_tokens
from models.types import CreateResult, LLMMessage, ModelInfo, RequestUsage, Tool, ToolChoice, ToolSchema

__all__ = ["ReplayChatCompletionClient", "ReplayExhausted"]

_STREAM_CHUNK_CHARS = 8


class ReplayExhausted(RuntimeError):
    """Every scripted reply has been given; ``reset()`` starts the script again."""


class ReplayChatCompletionClient(ChatCompletionClient):
    """Replies with ``chat_completions`` in order. A ``str`` becomes a ``stop`` result whose usage
    is the estimated prompt tokens and the reply's tokens; a ``CreateResult`` is returned as given
    (its usage counted). ``create_stream`` yields a text reply in chunks, then the result."""

    def __init__(
        self,
        chat_completions: Sequence[str | CreateResult],
        model_info: ModelInfo | None = None,
        *,
        model: str = "replay",
    ) -> None:
        self._script = list(chat_completions)
        self._model = model
        self._model_info: ModelInfo = {**PERMISSIVE_MODEL_INFO, **(model_info or {})}
        self._index = 0
        self._usage = RequestUsage()

    def _next(self, messages: Sequence[LLMMessage], tools: Sequence[Tool | ToolSchema]) -> CreateResult:
        if self._index >= len(self._script):
            raise ReplayExhausted(
                f"all {len(self._script)} scripted replies were used; call reset() to replay"
            )
        reply = self._script[self._index]
        self._index += 1
        if isinstance(reply, CreateResult):
            result = reply
        else:
            result = CreateResult(
                finish_reason="stop",
                content=reply,
                usage=RequestUsage(
                    prompt_tokens=estimate_tokens(messages, tools), completion_tokens=count_text_tokens(reply)
                ),
                cached=False,
                model=self._model,
            )
        self._usage = self._usage + result.usage
        return result

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        if cancellation_token is not None and cancellation_token.is_cancelled():
            raise asyncio.CancelledError("cancelled by its cancellation token")
        return self._next(messages, tools)

    async def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = (),
        tool_choice: ToolChoice = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        result = await self.create(messages, tools=tools, cancellation_token=cancellation_token)
        if isinstance(result.content, str):
            text = result.content
            for start in range(0, len(text), _STREAM_CHUNK_CHARS):
                if cancellation_token is not None and cancellation_token.is_cancelled():
                    raise asyncio.CancelledError("cancelled by its cancellation token")
                yield text[start : start + _STREAM_CHUNK_CHARS]
        yield result

    def reset(self) -> None:
        """Replay the script from its first reply; usage is zeroed."""
        self._index = 0
        self._usage = RequestUsage()

    async def close(self) -> None:
        return None

    def actual_usage(self) -> RequestUsage:
        return self._usage

    def total_usage(self) -> RequestUsage:
        return self._usage

    def count_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()) -> int:
        return estimate_tokens(messages, tools)

    def remaining_tokens(
        self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = ()
    ) -> int:
        return self._model_info.get("context_window", 128_000) - self.count_tokens(messages, tools=tools)

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    @property
    def cache_identity(self) -> Mapping[str, Any]:
        return {"provider": "replay", "model": self._model, "script": len(self._script)}
