"""What OpenAI accepts as a conversation, as far as tool calls go: the check the contexts must pass."""

from __future__ import annotations

from collections.abc import Sequence

from models import AssistantMessage, FunctionCall, FunctionExecutionResultMessage, LLMMessage


def tool_call_violations(messages: Sequence[LLMMessage]) -> list[str]:
    """Every ``tool`` message must answer a call of the assistant tool-call message before it
    (results may span several messages), and every call must be answered before anything else."""
    problems: list[str] = []
    pending: set[str] = set()
    in_results = False
    for index, message in enumerate(messages):
        if isinstance(message, FunctionExecutionResultMessage):
            if not in_results:
                problems.append(f"{index}: tool results without a tool-call message before them")
                continue
            for result in message.content:
                if result.call_id not in pending:
                    problems.append(f"{index}: result for unknown call {result.call_id}")
                pending.discard(result.call_id)
            continue
        if pending:
            problems.append(f"{index}: calls {sorted(pending)} unanswered before the next message")
        pending = set()
        in_results = isinstance(message, AssistantMessage) and isinstance(message.content, list)
        if in_results:
            pending = {call.id for call in message.content if isinstance(call, FunctionCall)}
    return problems
