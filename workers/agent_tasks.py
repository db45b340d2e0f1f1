"""Agent runs on workers: the handler of ``/v1/agent_runs`` requests, and one-off runs.

An agent run is a request in the ledger like a chat completion (kind ``agent_run``), so it gets
the same leases, sweeper and first-writer-wins result row; its handler runs ``agents.run_assistant``
with every model call routed through the worker's ``ModelCallPipeline`` (cache -> limiter ->
retry). A run redone after its worker died repeats no finished model call: each is a cache hit,
billed 0.

The body of an agent-run request::

    {"model": "gpt-4o-mini", "input": "question" | [OpenAI messages, the last a user message],
     "system_message": "...", "tools": ["calculator"], "max_tool_iterations": 5,
     "output_schema": {...}, "extra_create_args": {...}, "conversation_id": "conv_..."}

(every ``AssistantConfig`` field, plus ``input`` and ``conversation_id``). With a
``conversation_id`` the run continues that conversation (of the same tenant) and appends its
transcript to it; without one a new conversation is created. The result body
(``AgentRunOutcome.body``) holds the output, the transcript, and the usage of every model call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy.engine import Engine

from agents import (
    AssistantConfig,
    AssistantRunError,
    AssistantRunResult,
    ModelCall,
    ModelRequest,
    ToolRegistry,
    default_registry,
    run_assistant,
)
from agents.exceptions import UnknownToolError
from models.cancellation import CancellationToken
from models.errors import BadRequest, ModelClientError
from models.openai import messages_from_openai
from models.retry import RetryLater
from models.types import CreateResult, LLMMessage, RequestUsage, SystemMessage, UserMessage
from store import (
    ClaimedRequest,
    ConversationNotFound,
    InvalidArgument,
    PaidAnswer,
    RequestStatus,
    ResultRecord,
    append_messages,
    create_conversation,
    load_conversation,
)
from workers.pipeline import ModelCallPipeline
from workers.runner import RequestCancelled, RequestHandedBack, RequestHandler, failed_record

__all__ = [
    "MAX_TOOL_TIMEOUT_SECONDS",
    "AgentRunOutcome",
    "AgentRunSpec",
    "CallTally",
    "agent_run_handler",
    "check_agent_run_body",
    "conversation_id_for_run",
    "parse_agent_run_body",
    "pipeline_model_call",
    "run_agent",
]

_RUN_FIELDS = frozenset({"input", "conversation_id"})
# The longest a tenant's run may wait for one tool call. A run holds its worker slot while it
# waits, and the fair share hands out slots, not time: a tool that can be made to hang (one that
# fetches a URL the tenant names) with a timeout of days held a slot for good, and enough such runs
# held every slot of every worker. The workers hold a run stored before this check to it too.
MAX_TOOL_TIMEOUT_SECONDS = 600.0
_MESSAGES: TypeAdapter[list[LLMMessage]] = TypeAdapter(list[LLMMessage])


@dataclass(frozen=True)
class AgentRunSpec:
    """An agent-run request, read: the config, the new user message, messages given inline
    before it, and the conversation to continue (if any)."""

    config: AssistantConfig
    input: UserMessage
    inline_history: list[LLMMessage]
    conversation_id: str | None


def parse_agent_run_body(body: Mapping[str, Any]) -> AgentRunSpec:
    """Read an agent-run body; ``BadRequest`` says what is wrong with it."""
    config_fields = {key: value for key, value in body.items() if key not in _RUN_FIELDS}
    try:
        config = AssistantConfig.model_validate(config_fields)
    except ValidationError as e:
        raise BadRequest(f"invalid agent run: {e}", code="invalid_agent_run") from e
    raw_input = body.get("input")
    history: list[LLMMessage] = []
    if isinstance(raw_input, str):
        user = UserMessage(content=raw_input, source="user")
    elif isinstance(raw_input, list) and raw_input:
        *history, last = messages_from_openai(raw_input)
        if not isinstance(last, UserMessage):
            raise BadRequest("the last message of 'input' must be a user message", code="invalid_agent_run")
        user = last
        if history and isinstance(history[0], SystemMessage):
            # A system message given inline replaces the configured one.
            config = config.model_copy(update={"system_message": history[0].content})
            history = history[1:]
    else:
        raise BadRequest("'input' must be a string or a non-empty list of messages", code="invalid_agent_run")
    conversation_id = body.get("conversation_id")
    if conversation_id is not None and not isinstance(conversation_id, str):
        raise BadRequest("'conversation_id' must be a string", code="invalid_agent_run")
    return AgentRunSpec(config=config, input=user, inline_history=history, conversation_id=conversation_id)


@dataclass
class CallTally:
    """Upstream attempts made by the model calls of one run (retries included), and the answers
    it paid for (not the cache hits), in order."""

    attempts: int = 0
    paid: list[PaidAnswer] = dataclasses.field(default_factory=list)

    def spend_record(self, request_id: str, model: str, **fields: Any) -> ResultRecord:
        """A failed record of ``request_id`` carrying what the run paid for so far (a run that
        failed or was cancelled after some model calls): its spend is billed either way."""
        usage = RequestUsage()
        for answer in self.paid:
            usage = usage + answer.usage
        return ResultRecord(
            request_id=request_id,
            status=RequestStatus.FAILED,
            model=model,
            usage=usage,
            attempts=self.attempts,
            paid_answers=tuple(self.paid),
            **fields,
        )


def pipeline_model_call(
    pipeline: ModelCallPipeline,
    tally: CallTally | None = None,
    *,
    tenant_id: str | None = None,
    payer: str | None = None,
) -> ModelCall:
    """An ``agents.ModelCall`` through ``pipeline`` (the model named by each request), in
    ``tenant_id``'s cache namespace, paid for by ``payer`` (the run's request id)."""

    async def call(request: ModelRequest, cancellation_token: CancellationToken | None) -> CreateResult:
        outcome = await pipeline.call(
            request.model,
            request.messages,
            tools=request.tools,
            json_output=request.json_output,
            extra_create_args=request.extra_create_args,
            cancellation_token=cancellation_token,
            tenant_id=tenant_id,
            payer=payer,
        )
        if tally is not None:
            tally.attempts += outcome.attempts
            result = outcome.result
            if result is not None and not result.cached:
                tally.paid.append(PaidAnswer(result.response_id, result.model or request.model, result.usage))
        if outcome.error is not None:
            raise outcome.error
        assert outcome.result is not None
        return outcome.result

    return call


@dataclass(frozen=True)
class AgentRunOutcome:
    """A finished agent run: what the ledger and the API show of it."""

    conversation_id: str
    run: AssistantRunResult

    @property
    def all_cached(self) -> bool:
        return bool(self.run.model_calls) and all(call.cached for call in self.run.model_calls)

    @property
    def body(self) -> dict[str, Any]:
        run = self.run
        return {
            "object": "agent_run",
            "conversation_id": self.conversation_id,
            "status": "completed" if run.stop_reason == "answer" else "incomplete",
            "stop_reason": run.stop_reason,
            "output": run.output,
            "parsed_output": run.parsed_output,
            "error": run.error,
            "transcript": _MESSAGES.dump_python(run.transcript, mode="json"),
            "model_calls": [call.model_dump(mode="json") for call in run.model_calls],
            "usage": {
                "prompt_tokens": run.usage.prompt_tokens,
                "completion_tokens": run.usage.completion_tokens,
                "total_tokens": run.usage.total_tokens,
            },
        }


def conversation_id_for_run(run_id: str) -> str:
    """The id of the conversation a run without one creates: derived from the run, so a redone
    run finds the conversation its first attempt created instead of making a second one."""
    return "conv_" + hashlib.sha256(f"agent-run:{run_id}".encode()).hexdigest()[:32]


async def run_agent(
    engine: Engine,
    pipeline: ModelCallPipeline,
    spec: AgentRunSpec,
    *,
    tenant_id: str | None = None,
    tools: ToolRegistry | None = None,
    cancellation_token: CancellationToken | None = None,
    tally: CallTally | None = None,
    run_id: str | None = None,
    payer: str | None = None,
) -> AgentRunOutcome:
    """Run one agent run through ``pipeline``, continuing and extending its conversation in SQL.

    For the API and the CLI (one run, now) as well as the request handler. Raises ``BadRequest``
    for an unknown tool or a conversation that does not exist or belongs to another tenant, and
    ``AssistantRunError`` when a model call failed for good.

    ``run_id`` (the request id on workers) makes the run redoable: a redo reads the conversation
    as the first attempt did (so its model calls are the same calls, answered from the cache) and
    appends or creates nothing twice. ``payer`` names who pays in the cache (default ``run_id``).
    """
    registry = tools if tools is not None else default_registry
    unknown = [name for name in spec.config.tools if name not in registry]
    if unknown:
        raise BadRequest(f"unknown tools {unknown}; known: {registry.names()}", code="unknown_tool")
    history: list[LLMMessage] = []
    if spec.conversation_id is not None:
        try:
            history = await asyncio.to_thread(
                functools.partial(
                    load_conversation,
                    engine,
                    spec.conversation_id,
                    tenant_id=tenant_id,  # None (the local CLI): any conversation
                    before_run=run_id,
                )
            )
        except ConversationNotFound as e:
            raise BadRequest(
                f"no conversation {spec.conversation_id!r}", code="conversation_not_found"
            ) from e
    history.extend(spec.inline_history)
    run = await run_assistant(
        spec.config,
        spec.input,
        history,
        model_call=pipeline_model_call(pipeline, tally, tenant_id=tenant_id, payer=payer or run_id),
        tools=tools,
        cancellation_token=cancellation_token,
    )
    new_messages: Sequence[LLMMessage] = [*spec.inline_history, *run.transcript]
    if spec.conversation_id is None:
        conversation_id = await asyncio.to_thread(
            functools.partial(
                create_conversation,
                engine,
                tenant_id,
                new_messages,
                conversation_id=None if run_id is None else conversation_id_for_run(run_id),
                run_id=run_id,
            )
        )
    else:
        conversation_id = spec.conversation_id
        await asyncio.to_thread(
            functools.partial(append_messages, engine, conversation_id, new_messages, run_id=run_id)
        )
    return AgentRunOutcome(conversation_id=conversation_id, run=run)


def agent_run_handler(engine: Engine, tools: ToolRegistry | None = None) -> RequestHandler:
    """The ``ChunkRunner`` handler of ``agent_run`` requests."""

    async def complete_agent_run(
        request: ClaimedRequest, pipeline: ModelCallPipeline, token: CancellationToken
    ) -> ResultRecord:
        try:
            spec = parse_agent_run_body(request.body)
        except ModelClientError as e:
            return failed_record(request.id, e, attempts=0)
        if spec.config.tool_timeout_seconds > MAX_TOOL_TIMEOUT_SECONDS:
            bounded = spec.config.model_copy(update={"tool_timeout_seconds": MAX_TOOL_TIMEOUT_SECONDS})
            spec = dataclasses.replace(spec, config=bounded)
        tally = CallTally()
        try:
            outcome = await run_agent(
                engine,
                pipeline,
                spec,
                tenant_id=request.tenant_id,
                tools=tools,
                cancellation_token=token,
                tally=tally,
                run_id=request.id,
                payer=_payer(request),
            )
        except asyncio.CancelledError:
            if token.is_cancelled():
                # Stopped between model calls: those it made are paid for, and billed.
                spent = tally.spend_record(request.id, spec.config.model, error_code="cancelled")
                raise RequestCancelled(request.id, spent if spent.paid_answers else None) from None
            raise
        except ModelClientError as e:  # an unknown tool, a bad conversation id
            return failed_record(request.id, e, attempts=tally.attempts)
        except AssistantRunError as e:
            cause = e.__cause__
            if isinstance(cause, RetryLater):
                cause.attempts += tally.attempts  # the run's earlier calls count too
                # The runner hands the run back in line and bills what it paid for so far.
                spent = tally.spend_record(request.id, spec.config.model, error_code="handed_back")
                raise RequestHandedBack(cause, spent if spent.paid_answers else None) from None
            error = cause if isinstance(cause, ModelClientError) else ModelClientError(str(e))
            record = failed_record(request.id, error, attempts=tally.attempts)
            # What the failed run spent before failing is still spent.
            spent = tally.spend_record(request.id, spec.config.model)
            body = record.response_body
            if e.partial.model_calls:
                # The calls it made, answer ids included: a duplicate that reused those answers
                # is then not billed for them again (see ``store.results``).
                calls = [call.model_dump(mode="json") for call in e.partial.model_calls]
                body = {**(body or {}), "model_calls": calls}
            return dataclasses.replace(
                record,
                response_body=body,
                usage=spent.usage,
                model=spent.model,
                paid_answers=spent.paid_answers,
            )
        run = outcome.run
        cached = outcome.all_cached
        last_model = run.model_calls[-1].model if run.model_calls else spec.config.model
        return ResultRecord(
            request_id=request.id,
            status=RequestStatus.SUCCEEDED,
            response_body=outcome.body,
            status_code=200,
            # The final answer's id; every call's is in the body's model_calls (for the ledger).
            upstream_request_id=run.model_calls[-1].response_id if run.model_calls else None,
            finish_reason=run.stop_reason,
            model=last_model,
            # A fully cached run records what it represents (billed 0 as a hit); otherwise what
            # the calls that went upstream spent.
            usage=_total(run) if cached else run.usage,
            cached=cached,
            latency_ms=sum(call.latency_seconds for call in run.model_calls) * 1000.0,
            attempts=tally.attempts,
            # Each answer paid for, so a result not kept (a duplicate delivery) bills those of
            # them the kept one does not.
            paid_answers=tuple(tally.paid),
        )

    return complete_agent_run


def _payer(request: ClaimedRequest) -> str:
    """Whom the run's model calls bill in the cache. A redo after a crash is the same payer: the
    answers it finds of its own were never billed, so they are its calls. A redo after a hand-back
    is another payer (each hand-back with paid answers adds upstream attempts): the answers paid
    before it were billed at hand-back, so it gets them as free hits."""
    if not request.handed_back_attempts:
        return request.id
    return f"{request.id}/after-{request.handed_back_attempts}"


def _total(run: AssistantRunResult) -> RequestUsage:
    total = RequestUsage()
    for call in run.model_calls:
        total = total + call.usage
    return total


def check_agent_run_body(body: Mapping[str, Any]) -> None:
    """Refuse an agent run a worker would fail before its first model call (``store.ExtraBodyCheck``):
    a body that is not a run (``invalid_agent_run``) or names a tool the workers do not have
    (``unknown_tool``). For ``POST /v1/agent_runs`` and every agent-run line of a batch alike."""
    try:
        spec = parse_agent_run_body(body)
    except ModelClientError as e:
        raise InvalidArgument(e.message, code=e.code) from e
    if spec.config.tool_timeout_seconds > MAX_TOOL_TIMEOUT_SECONDS:
        raise InvalidArgument(
            f"'tool_timeout_seconds' is at most {MAX_TOOL_TIMEOUT_SECONDS:g}",
            "tool_timeout_seconds",
            code="invalid_agent_run",
        )
    try:
        default_registry.select(spec.config.tools)
    except UnknownToolError as e:
        raise InvalidArgument(str(e), "tools", code="unknown_tool") from e
