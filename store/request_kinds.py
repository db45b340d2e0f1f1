"""Request kinds as the ledger takes them: one entry per kind (:data:`REQUEST_KINDS`) names its
endpoint, checks a line's body before it is stored, and says where a short-form line's ``prompt``
goes. The handler that runs each kind is registered on the workers' side
(``workers.handlers.KIND_HANDLERS``); a new kind (embeddings, responses) is one entry on each side
and a :class:`~store.tables.RequestKind` value.

The checks here are what ingest can say of a line without the code that runs it (a field missing or
of the wrong type); the handler reads the body in full and fails the request with a named error
for anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from store.tables import MAX_MODEL_CHARS, RequestKind

__all__ = ["ENDPOINT_KINDS", "REQUEST_KINDS", "BadLine", "RequestKindSpec", "require_field"]


class BadLine(Exception):
    """A line (or its body) that cannot be a request; ``code`` names why, ``param`` where."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def require_field(
    obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], label: str, prefix: str = ""
) -> Any:
    """``obj[key]``, present and of type ``kind`` (described as ``label``); raises BadLine."""
    if key not in obj or obj[key] is None:
        raise BadLine("missing_field", f"missing required field '{prefix}{key}'", prefix + key)
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadLine("wrong_type", f"'{prefix}{key}' must be {label}", prefix + key)
    return value


# Checks a body (``prefix`` is where it sits in the line, ``"body."`` or ``""``); raises BadLine.
BodyCheck = Callable[[Mapping[str, Any], str], None]
# Puts a short-form line's ``prompt`` (None when absent) into its body; ``line`` is the line's own
# fields (without ``custom_id`` and ``prompt``). Raises BadLine.
TakePrompt = Callable[[dict[str, Any], Any, Mapping[str, Any]], None]


@dataclass(frozen=True)
class RequestKindSpec:
    kind: RequestKind
    endpoint: str
    check_body: BodyCheck
    take_prompt: TakePrompt


def _check_model(body: Mapping[str, Any], prefix: str) -> None:
    model = require_field(body, "model", str, "a string", prefix)
    if not model:
        raise BadLine("invalid_value", f"'{prefix}model' must not be empty", prefix + "model")
    if len(model) > MAX_MODEL_CHARS:
        # The ledger keeps the model's name (results, prices): a longer one would be sent upstream,
        # paid for, and then fail to be recorded.
        raise BadLine(
            "invalid_value", f"'{prefix}model' is longer than {MAX_MODEL_CHARS} characters", prefix + "model"
        )


def _check_chat_body(body: Mapping[str, Any], prefix: str) -> None:
    _check_model(body, prefix)
    messages = require_field(body, "messages", list, "a list of messages", prefix)
    if not messages:
        raise BadLine("invalid_value", f"'{prefix}messages' must not be empty", prefix + "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadLine(
                "wrong_type",
                f"'{prefix}messages[{index}]' must be an object with a string 'role'",
                f"{prefix}messages[{index}]",
            )


def _chat_prompt(body: dict[str, Any], prompt: Any, line: Mapping[str, Any]) -> None:
    """The prompt becomes one user message; without one, the line gives its ``messages``."""
    if prompt is not None:
        if not isinstance(prompt, str):
            raise BadLine("wrong_type", "'prompt' must be a string", "prompt")
        body["messages"] = [{"role": "user", "content": prompt}]
    elif "messages" not in line:
        raise BadLine("missing_field", "a line needs 'prompt' or 'messages' (or OpenAI's 'body')", "prompt")


def _check_agent_run_body(body: Mapping[str, Any], prefix: str) -> None:
    _check_model(body, prefix)
    require_field(body, "input", (str, list), "a string or a list of messages", prefix)


def _agent_run_prompt(body: dict[str, Any], prompt: Any, line: Mapping[str, Any]) -> None:
    """The prompt is the run's ``input``."""
    if prompt is not None:
        body["input"] = prompt


REQUEST_KINDS: Mapping[str, RequestKindSpec] = MappingProxyType(
    {
        spec.endpoint: spec
        for spec in (
            RequestKindSpec(
                RequestKind.CHAT_COMPLETION, "/v1/chat/completions", _check_chat_body, _chat_prompt
            ),
            RequestKindSpec(
                RequestKind.AGENT_RUN, "/v1/agent_runs", _check_agent_run_body, _agent_run_prompt
            ),
        )
    }
)
ENDPOINT_KINDS: Mapping[str, RequestKind] = MappingProxyType(
    {endpoint: spec.kind for endpoint, spec in REQUEST_KINDS.items()}
)
