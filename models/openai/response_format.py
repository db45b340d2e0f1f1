"""Which ``response_format`` a request sends: from ``json_output``, the request and the client."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel

from models.errors import BadRequest

__all__ = ["JSON_OBJECT", "ResponseFormat", "resolve_response_format", "schema_response_format"]

ResponseFormat = type[BaseModel] | Mapping[str, Any]

JSON_OBJECT: Mapping[str, Any] = {"type": "json_object"}


@lru_cache(maxsize=512)
def schema_response_format(model: type[BaseModel]) -> Mapping[str, Any]:
    """OpenAI's strict ``json_schema`` format for a pydantic class (computed once per class; the
    result is shared, never mutate it)."""
    return {
        "type": "json_schema",
        "json_schema": {"name": model.__name__, "schema": to_strict_json_schema(model), "strict": True},
    }


def as_response_format(value: object) -> Mapping[str, Any]:
    if isinstance(value, type) and issubclass(value, BaseModel):
        return schema_response_format(value)
    if isinstance(value, Mapping) and isinstance(value.get("type"), str):
        return value
    raise BadRequest(
        f"response_format must be a pydantic model class or an OpenAI format dict, not {value!r}"
    )


def resolve_response_format(
    json_output: bool | type[BaseModel] | None,
    request_format: object | None,
    client_format: Mapping[str, Any] | None,
) -> Mapping[str, Any] | None:
    """The format to send, most specific first: a class given as ``json_output``; the request's
    ``response_format``; the client's (unless ``json_output=False``). ``json_output=True`` keeps
    a schema if one applies (schema output is JSON) and otherwise asks for ``json_object``."""
    if isinstance(json_output, type):
        return schema_response_format(json_output)
    if request_format is not None:
        chosen: Mapping[str, Any] | None = as_response_format(request_format)
    elif json_output is False:
        chosen = None
    else:
        chosen = client_format
    if json_output is True and (chosen is None or chosen.get("type") == "text"):
        return JSON_OBJECT
    return chosen
