"""The cache key: a SHA-256 of the canonical JSON of everything that changes an answer.

What goes in: the inner client's ``cache_identity`` (provider, endpoint, model, default create
args), the messages, the tools' schemas (in order: order is part of the prompt), ``tool_choice``,
``json_output`` (a pydantic class as its JSON schema) and ``extra_create_args`` (a pydantic class
given as ``response_format`` likewise). Canonical JSON sorts keys and has no whitespace, so the
order of keys in a dict never changes a key, and integral floats are written as integers
(``temperature=1`` and ``1.0`` mean the same to a provider).

A ``namespace`` (empty by default) partitions the keys: the same request in two namespaces has two
keys, so two callers that must not see each other's answers (tenants, say: the caller decides what a
namespace means) share neither entries nor single-flight locks.

What stays out: secrets and pure transport settings. Top-level ``extra_create_args`` and identity
entries named like a credential (``api_key``, ``authorization``, ...), the same names inside header
and query mappings (``extra_headers``, ``extra_query``, ...), and ``timeout``/``max_retries``.
Messages and tool schemas are never filtered: a tool parameter called ``api_key`` is part of the
prompt, and dropping it would let two different tools share an answer.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr

from models.cache.errors import UncacheableRequestError
from models.types import FunctionExecutionResultMessage, LLMMessage, Tool, ToolChoice, ToolSchema

__all__ = [
    "KEY_FORMAT_VERSION",
    "canonical_json",
    "identity_json",
    "request_key",
    "request_key_of_identity_json",
]

KEY_FORMAT_VERSION = 1
"""Bumped when the key's recipe changes, so old entries are simply never found again."""

_SECRET_NAMES = frozenset(
    {
        "api_key",
        "apikey",
        "x_api_key",
        "authorization",
        "proxy_authorization",
        "cookie",
        "azure_ad_token",
        "azure_ad_token_provider",
        "access_token",
        "bearer_token",
        "password",
        "secret",
        "client_secret",
    }
)
# Arguments that shape the HTTP exchange, not the answer.
# ``stream_options`` says what a stream carries besides the answer (a usage chunk), not the answer:
# a streamed call and a plain one share their cache entry.
_TRANSPORT_NAMES = frozenset({"timeout", "max_retries", "http_client", "stream_options"})
# Mappings whose entries are HTTP headers or query parameters: filtered by name too.
_HEADER_MAPPINGS = frozenset({"extra_headers", "headers", "default_headers", "extra_query", "default_query"})


def _normal_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _is_secret(name: str, value: object) -> bool:
    return _normal_name(name) in _SECRET_NAMES or isinstance(value, SecretStr | SecretBytes)


def _canonical(value: object) -> Any:
    """``value`` as plain JSON data, or ``UncacheableRequestError`` if it has no stable form."""
    # Exact-type checks first: they are the common case and much cheaper than ABC checks.
    kind = type(value)
    if value is None or kind is str or kind is bool:
        return value
    if kind is dict:
        return _canonical_mapping(value)  # type: ignore[arg-type]
    if kind is list or kind is tuple:
        return [_canonical(item) for item in value]  # type: ignore[attr-defined]
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UncacheableRequestError(f"non-finite number {value!r} cannot be keyed")
        return int(value) if value.is_integer() else value
    if isinstance(value, enum.Enum):
        return _canonical(value.value)
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json"))
    if isinstance(value, type) and issubclass(value, BaseModel):
        return {"pydantic_model": value.__name__, "json_schema": _canonical(value.model_json_schema())}
    if isinstance(value, Mapping):
        return _canonical_mapping(value)
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    if isinstance(value, Tool):
        return _canonical(value.schema)
    raise UncacheableRequestError(f"{type(value).__qualname__} has no canonical JSON form")


def _canonical_mapping(value: Mapping[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, item in value.items():
        if not isinstance(name, str):
            raise UncacheableRequestError(f"mapping key {name!r} is not a string")
        out[name] = _canonical(item)
    return out


def _without_secrets(args: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level arguments minus credentials and transport settings; header/query mappings
    filtered by name as well."""
    kept: dict[str, Any] = {}
    for name, value in args.items():
        normal = _normal_name(name)
        if _is_secret(name, value) or normal in _TRANSPORT_NAMES:
            continue
        if normal in _HEADER_MAPPINGS and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if not (isinstance(k, str) and _is_secret(k, v))}
        kept[name] = value
    return kept


def canonical_json(value: object) -> str:
    """Sorted keys, no whitespace, no NaN: equal data gives equal text."""
    return json.dumps(
        _canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


# The usual values of tool_choice and json_output, pre-rendered (the hit path computes a key per call).
_SIMPLE_JSON: dict[object, str] = {
    "auto": '"auto"',
    "none": '"none"',
    "required": '"required"',
    None: "null",
    True: "true",
    False: "false",
}


def _simple_json(value: object) -> str | None:
    # Only exact str/bool/None are looked up: a Tool object may not even be hashable.
    return _SIMPLE_JSON.get(value) if value is None or type(value) is str or type(value) is bool else None


def _tool_schema(tool: Tool | ToolSchema) -> str:
    if type(tool) is dict:
        return canonical_json(tool)
    return canonical_json(tool.schema if isinstance(tool, Tool) else tool)


def _tool_choice(choice: ToolChoice) -> Any:
    if type(choice) is str:
        return choice
    return {"function": choice.name} if isinstance(choice, Tool) else choice


def _read_from_openai(message: LLMMessage) -> bool:
    if isinstance(message, FunctionExecutionResultMessage):
        return any(result.openai_message is not None for result in message.content)
    return getattr(message, "openai_message", None) is not None


_EXCLUDE_OWN = {"openai_message"}
_EXCLUDE_NESTED = {"content": {"__all__": {"openai_message"}}}


def _message_json(message: LLMMessage) -> str:
    # A message's fields come in its class's fixed order, so pydantic's own JSON is canonical (and
    # several times faster than re-sorting a dump) unless it holds the free-form OpenAI message it
    # was read from: that one is sorted, and every field of it (``name``, ``refusal``, ...) is in the
    # key. Built in code, it has none, and its key is the one it always had.
    if isinstance(message, BaseModel):
        if _read_from_openai(message):
            return canonical_json(message)
        # The serializer itself, not model_dump_json: the same JSON without the wrapper's
        # argument handling, which cost as much as the serializing (one key per cache lookup).
        exclude = _EXCLUDE_NESTED if isinstance(message, FunctionExecutionResultMessage) else _EXCLUDE_OWN
        return message.__pydantic_serializer__.to_json(message, exclude=exclude).decode("utf-8")
    return canonical_json(message)


def identity_json(identity: Mapping[str, Any]) -> str:
    """A client identity as ``request_key`` writes it into the key (secrets left out)."""
    return canonical_json(_without_secrets(identity))


def request_key(
    identity: Mapping[str, Any],
    messages: Sequence[LLMMessage],
    *,
    tools: Sequence[Tool | ToolSchema] = (),
    tool_choice: ToolChoice = "auto",
    json_output: bool | type[BaseModel] | None = None,
    extra_create_args: Mapping[str, Any] = {},
    namespace: str = "",
) -> str:
    """The hex SHA-256 naming one request's answer (stores add their prefix to it).

    The hashed text is one JSON array of canonical JSON values: the format version, the client
    identity, the messages, the tools, tool_choice, json_output and extra_create_args, then the
    namespace if there is one (so the keys of the empty namespace are those it always had).
    Raises ``UncacheableRequestError`` when an argument has no canonical JSON form.
    """
    return request_key_of_identity_json(
        identity_json(identity),
        messages,
        tools=tools,
        tool_choice=tool_choice,
        json_output=json_output,
        extra_create_args=extra_create_args,
        namespace=namespace,
    )


def request_key_of_identity_json(
    identity: str,
    messages: Sequence[LLMMessage],
    *,
    tools: Sequence[Tool | ToolSchema] = (),
    tool_choice: ToolChoice = "auto",
    json_output: bool | type[BaseModel] | None = None,
    extra_create_args: Mapping[str, Any] = {},
    namespace: str = "",
) -> str:
    """``request_key`` for a caller that rendered the identity already (``identity_json``): a
    client's identity is fixed, and rendering it was most of a key's cost."""
    parts = [
        str(KEY_FORMAT_VERSION),
        identity,
        "[" + ",".join(_message_json(message) for message in messages) + "]",
        "[" + ",".join(_tool_schema(tool) for tool in tools) + "]" if tools else "[]",
        _simple_json(tool_choice) or canonical_json(_tool_choice(tool_choice)),
        _simple_json(json_output) or canonical_json(json_output),
        canonical_json(_without_secrets(extra_create_args)) if extra_create_args else "{}",
    ]
    if namespace:
        parts.append(json.dumps(namespace, ensure_ascii=False))
    return hashlib.sha256(("[" + ",".join(parts) + "]").encode("utf-8")).hexdigest()
