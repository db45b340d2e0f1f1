"""The assistant runner: declarative agent runs (model, system message, tools, iteration cap).

``run_assistant(config, input, conversation)`` calls the model, runs the tool calls it asks for,
feeds their results back, and stops at a text answer or at the iteration cap. A bad tool call (an
unknown tool, arguments that are not a JSON object or fail the tool's schema, a tool that raises
or times out) goes back to the model as ``FunctionExecutionResult(is_error=True)``: the model
sees what went wrong and the run goes on.

Every model call goes through one ``ModelCall`` callable. In a script it is a client
(``client_model_call(client)``, optionally a ``ChatCompletionCache``); on a worker it is the
workers' cache -> limiter -> retry -> ledger pipeline, which is why a request is a plain value
(``ModelRequest``) carrying the model name and the call's position in the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agents.exceptions import AssistantRunError
from agents.function_tool import FunctionTool, return_value_as_string
from agents.tools import ToolRegistry, default_registry
from models.base import ChatCompletionClient
from models.cancellation import CancellationToken
from models.types import (
    AssistantMessage,
    CreateResult,
    FunctionCall,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    LLMMessage,
    RequestUsage,
    SystemMessage,
    Tool,
    ToolSchema,
    UserMessage,
)

__all__ = [
    "AssistantConfig",
    "AssistantRunResult",
    "ModelCall",
    "ModelCallRecord",
    "ModelRequest",
    "StopReason",
    "client_model_call",
    "run_assistant",
]

StopReason = Literal["answer", "max_tool_iterations", "invalid_output", "error"]


class AssistantConfig(BaseModel):
    """What an assistant run is: JSON in, JSON out, so an API request or a batch line can carry it.

    ``output_schema`` asks for structured output by JSON schema (sent as OpenAI's ``json_schema``
    response format; the answer must parse as JSON). A pydantic class is passed to
    ``run_assistant(output_type=...)`` instead, since a class does not travel as JSON.
    """

    model_config = ConfigDict(extra="forbid")

    model: str
    system_message: str | None = "You are a helpful AI assistant."
    tools: list[str] = Field(default_factory=list, description="names of registered tools")
    max_tool_iterations: int = Field(default=5, ge=1, le=100, description="rounds of tool calls allowed")
    output_schema: dict[str, Any] | None = None
    tool_timeout_seconds: float = Field(default=60.0, gt=0)
    extra_create_args: dict[str, Any] = Field(
        default_factory=dict, description="passed to every model call (temperature, max_tokens, ...)"
    )


@dataclass(frozen=True)
class ModelRequest:
    """One model call of a run. ``call_index`` is its position in the run (0, 1, ...)."""

    model: str
    messages: Sequence[LLMMessage]
    tools: Sequence[ToolSchema]
    json_output: bool | type[BaseModel] | None
    extra_create_args: Mapping[str, Any]
    call_index: int


ModelCall = Callable[[ModelRequest, CancellationToken | None], Awaitable[CreateResult]]
"""Makes one model call: a client in a script, the workers' pipeline on a worker."""


def client_model_call(client: ChatCompletionClient) -> ModelCall:
    """Calls through ``client``. The client's own model answers (``ModelRequest.model`` is what
    the run's config named; a pipeline picks the client by it)."""

    async def call(request: ModelRequest, cancellation_token: CancellationToken | None) -> CreateResult:
        return await client.create(
            request.messages,
            tools=request.tools,
            json_output=request.json_output,
            extra_create_args=request.extra_create_args,
            cancellation_token=cancellation_token,
        )

    return call


class ModelCallRecord(BaseModel):
    """What one model call cost and how it went. A cache hit (``cached``) billed nothing: its
    ``usage`` is what the cached answer represents, not what was spent. ``response_id`` is the
    provider's id of the answer, which tells a bill for it apart from a bill for another."""

    model: str
    usage: RequestUsage
    cached: bool
    latency_seconds: float
    finish_reason: str
    response_id: str | None = None


class AssistantRunResult(BaseModel):
    """``transcript`` is what this run added to the conversation, in order: the user's input, each
    tool-call message and its results, and the final answer. Append it to continue later."""

    output: str | None
    parsed_output: Any = None
    stop_reason: StopReason
    error: str | None = None
    transcript: list[LLMMessage]
    model_calls: list[ModelCallRecord]

    @property
    def usage(self) -> RequestUsage:
        """Tokens spent upstream (cache hits count nothing)."""
        total = RequestUsage()
        for call in self.model_calls:
            if not call.cached:
                total = total + call.usage
        return total


@dataclass
class _Run:
    config: AssistantConfig
    model_call: ModelCall
    tools: dict[str, Tool]
    output_type: type[BaseModel] | None
    cancellation_token: CancellationToken | None
    prefix: list[LLMMessage]
    transcript: list[LLMMessage]
    records: list[ModelCallRecord] = field(default_factory=list)

    def result(
        self, stop_reason: StopReason, output: str | None, parsed: Any = None, error: str | None = None
    ) -> AssistantRunResult:
        return AssistantRunResult(
            output=output,
            parsed_output=parsed,
            stop_reason=stop_reason,
            error=error,
            transcript=list(self.transcript),
            model_calls=list(self.records),
        )

    def structured_output(self) -> tuple[bool | type[BaseModel] | None, dict[str, Any]]:
        extra = dict(self.config.extra_create_args)
        if self.output_type is not None:
            return self.output_type, extra
        if self.config.output_schema is not None:
            extra["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": self.config.output_schema},
            }
        return None, extra

    async def call_model(
        self, json_output: bool | type[BaseModel] | None, extra: dict[str, Any]
    ) -> CreateResult:
        request = ModelRequest(
            model=self.config.model,
            messages=[*self.prefix, *self.transcript],
            tools=[tool.schema for tool in self.tools.values()],
            json_output=json_output,
            extra_create_args=extra,
            call_index=len(self.records),
        )
        started = time.perf_counter()
        try:
            result = await self.model_call(request, self.cancellation_token)
        except Exception as e:
            raise AssistantRunError(
                f"model call {request.call_index} failed: {e}",
                partial=self.result("error", None, error=str(e)),
            ) from e
        self.records.append(
            ModelCallRecord(
                model=result.model or self.config.model,
                usage=result.usage,
                cached=result.cached,
                latency_seconds=time.perf_counter() - started,
                finish_reason=result.finish_reason,
                response_id=result.response_id,
            )
        )
        return result

    async def execute(self, call: FunctionCall) -> FunctionExecutionResult:
        def error(text: str) -> FunctionExecutionResult:
            return FunctionExecutionResult(
                content=f"Error: {text}", name=call.name, call_id=call.id, is_error=True
            )

        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(self.tools)) or "none"
            return error(f"unknown tool {call.name!r}; available tools: {known}")
        try:
            args = json.loads(call.arguments or "{}")
        except json.JSONDecodeError as e:
            return error(f"arguments are not valid JSON: {e}")
        if not isinstance(args, dict):
            return error("arguments must be a JSON object")
        try:
            if isinstance(tool, FunctionTool):
                running = tool.run_json(args, cancellation_token=self.cancellation_token)
            else:
                running = tool.run_json(args)
            value = await asyncio.wait_for(running, self.config.tool_timeout_seconds)
        except TimeoutError:
            return error(f"{call.name} did not finish within {self.config.tool_timeout_seconds:g} s")
        except Exception as e:  # whatever a tool raises is the model's to see, not the run's end
            return error(f"{type(e).__name__}: {e}")
        return FunctionExecutionResult(
            content=return_value_as_string(value), name=call.name, call_id=call.id, is_error=False
        )

    def answer(self, text: str) -> AssistantRunResult:
        if self.output_type is not None:
            try:
                parsed = self.output_type.model_validate_json(text).model_dump(mode="json")
            except ValidationError as e:
                return self.result(
                    "invalid_output", text, error=f"the answer does not fit the output type: {e}"
                )
            return self.result("answer", text, parsed)
        if self.config.output_schema is not None:
            try:
                return self.result("answer", text, json.loads(text))
            except json.JSONDecodeError as e:
                return self.result("invalid_output", text, error=f"the answer is not JSON: {e}")
        return self.result("answer", text)

    async def run(self) -> AssistantRunResult:
        json_output, extra = self.structured_output()
        rounds = 0
        while True:
            if self.cancellation_token is not None and self.cancellation_token.is_cancelled():
                raise asyncio.CancelledError("the assistant run was cancelled")
            result = await self.call_model(json_output, extra)
            if isinstance(result.content, str) or not result.content:
                text = result.content if isinstance(result.content, str) else ""
                self.transcript.append(AssistantMessage(content=text, thought=result.thought))
                return self.answer(text)
            calls = result.content
            self.transcript.append(AssistantMessage(content=calls, thought=result.thought))
            if rounds >= self.config.max_tool_iterations:
                # The calls get (refused) results so the conversation stays valid to continue.
                refused = [
                    FunctionExecutionResult(
                        content=f"Error: not run, the limit of {rounds} tool rounds was reached",
                        name=call.name,
                        call_id=call.id,
                        is_error=True,
                    )
                    for call in calls
                ]
                self.transcript.append(FunctionExecutionResultMessage(content=refused))
                return self.result("max_tool_iterations", None)
            results = await asyncio.gather(*(self.execute(call) for call in calls))
            self.transcript.append(FunctionExecutionResultMessage(content=list(results)))
            rounds += 1


async def run_assistant(
    config: AssistantConfig,
    input: str | UserMessage,
    conversation: Sequence[LLMMessage] = (),
    *,
    client: ChatCompletionClient | None = None,
    model_call: ModelCall | None = None,
    tools: ToolRegistry | None = None,
    output_type: type[BaseModel] | None = None,
    cancellation_token: CancellationToken | None = None,
) -> AssistantRunResult:
    """Run an assistant on ``input``, continuing ``conversation`` (earlier messages, without the
    system message), with exactly one of ``client`` or ``model_call``.

    Tools are looked up by name in ``tools`` (default: ``agents.default_registry``); a config
    naming an unknown tool raises ``UnknownToolError`` before any model call. A model call that
    fails raises ``AssistantRunError`` carrying the run so far.
    """
    if model_call is None:
        if client is None:
            raise ValueError("pass client= or model_call=")
        model_call = client_model_call(client)
    elif client is not None:
        raise ValueError("pass client= or model_call=, not both")
    registry = tools if tools is not None else default_registry
    selected = {tool.name: tool for tool in registry.select(config.tools)}
    user = input if isinstance(input, UserMessage) else UserMessage(content=input, source="user")
    system: list[LLMMessage] = [SystemMessage(content=config.system_message)] if config.system_message else []
    run = _Run(
        config=config,
        model_call=model_call,
        tools=selected,
        output_type=output_type,
        cancellation_token=cancellation_token,
        prefix=[*system, *conversation],
        transcript=[user],
    )
    return await run.run()
