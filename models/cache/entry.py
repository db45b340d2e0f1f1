"""What the chat cache stores per key, and how it becomes bytes.

An entry is the ``CreateResult`` plus, when a stream produced it, the list of ``str`` chunks the
stream yielded, so a hit through ``create_stream`` replays the same chunks. On the wire it is one
JSON object with a ``format`` version; any other version, or bytes that do not parse, is a
``CacheEntryError`` (the cache treats it as a miss), so processes running different versions of
tokenmill can share one store without misreading each other.
"""

from __future__ import annotations

import json
from typing import Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from models.cache.errors import CacheEntryError
from models.types import CreateResult

__all__ = [
    "CACHED_COMPLETION_CODEC",
    "CHAT_CACHE_VALUE_TYPE",
    "ENTRY_FORMAT_VERSION",
    "CachedCompletion",
    "CachedCompletionCodec",
    "ValueCodec",
]

ENTRY_FORMAT_VERSION = 1

T = TypeVar("T")


class CachedCompletion(BaseModel):
    """One cached answer. ``chunks`` is None when ``create`` stored it, the streamed chunks when
    ``create_stream`` did. ``paid_by`` names who paid for the upstream call that made it (see
    ``models.cache.client.paying_as``), None if nobody said; an optional field, so entries of
    either shape are read by both versions."""

    model_config = ConfigDict(frozen=True)

    format: Literal[1] = 1  # ENTRY_FORMAT_VERSION
    result: CreateResult
    chunks: list[str] | None = None
    paid_by: str | None = None


CHAT_CACHE_VALUE_TYPE = CachedCompletion
"""The value type of the chat cache's stores (AutoGen's name, for ``RedisStore[CHAT_CACHE_VALUE_TYPE]``)."""


class ValueCodec(Protocol, Generic[T]):
    """Turns a store's values into bytes and back; ``decode`` raises ``CacheEntryError``."""

    def encode(self, value: T) -> bytes: ...

    def decode(self, data: bytes) -> T: ...


class CachedCompletionCodec:
    """JSON bytes of a ``CachedCompletion`` (pydantic's Rust serializer both ways)."""

    def encode(self, value: CachedCompletion) -> bytes:
        return value.model_dump_json().encode("utf-8")

    def decode(self, data: bytes) -> CachedCompletion:
        try:
            return CachedCompletion.model_validate_json(data)
        except ValidationError as e:
            raise CacheEntryError(_describe_unreadable(data)) from e


def _describe_unreadable(data: bytes) -> str:
    try:
        document = json.loads(data)
    except ValueError:
        return f"entry of {len(data)} bytes is not JSON"
    if isinstance(document, dict) and document.get("format") != ENTRY_FORMAT_VERSION:
        return f"entry has format {document.get('format')!r}, this version reads {ENTRY_FORMAT_VERSION}"
    return "entry does not match the CachedCompletion shape"


CACHED_COMPLETION_CODEC = CachedCompletionCodec()
