"""Names of agents: ``AgentType`` (a registered kind) and ``AgentId`` (one instance of it)."""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["AgentId", "AgentType", "TopicId"]

# AutoGen's rule: a type is a word of letters, digits, "_", "-" and ".", so "type/key" parses back.
_AGENT_TYPE = re.compile(r"^[\w\-.]+\Z")


@dataclass(frozen=True, slots=True)
class AgentType:
    """A kind of agent, as registered with a runtime (``register_factory`` returns one)."""

    type: str


class AgentId:
    """One agent instance: its registered ``type`` and a ``key`` (a conversation, a user, ...).

    ``str(agent_id)`` is ``"type/key"``; ``AgentId.from_str`` reads it back.
    """

    __slots__ = ("_key", "_type")

    def __init__(self, type: str | AgentType, key: str) -> None:
        name = type.type if isinstance(type, AgentType) else type
        if not _AGENT_TYPE.match(name):
            raise ValueError(f"invalid agent type {name!r}: use letters, digits, '_', '-' and '.'")
        self._type = name
        self._key = key

    @classmethod
    def from_str(cls, agent_id: str) -> AgentId:
        type_, sep, key = agent_id.partition("/")
        if not sep:
            raise ValueError(f"invalid agent id {agent_id!r}: expected 'type/key'")
        return cls(type_, key)

    @property
    def type(self) -> str:
        return self._type

    @property
    def key(self) -> str:
        return self._key

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AgentId):
            return NotImplemented
        return (self._type, self._key) == (other._type, other._key)

    def __hash__(self) -> int:
        return hash((self._type, self._key))

    def __str__(self) -> str:
        return f"{self._type}/{self._key}"

    def __repr__(self) -> str:
        return f"AgentId(type={self._type!r}, key={self._key!r})"


@dataclass(frozen=True, slots=True)
class TopicId:
    """A topic a message was published to (kept for ``MessageContext.topic_id``; direct messages
    carry ``None``)."""

    type: str
    source: str

    def __str__(self) -> str:
        return f"{self.type}/{self.source}"
