"""Messages as JSON, for runtimes that carry them between processes.

A message (a dataclass, a pydantic model, or a plain JSON value) is written as
``{"type": "<module>.<QualName>", "data": <its fields as JSON>}`` and read back through a registry
of the classes this process knows: only registered classes are ever built from a payload, never a
class named by the payload alone. A ``RoutedAgent`` class registers the message types its handlers
take and return (``register_agent_class``), so registering an agent type registers its messages.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from agents.exceptions import MessageSerializationError

__all__ = ["MessageTypeRegistry", "default_message_types", "message_type_name"]

_JSON_TYPE = "json"
_JSON_VALUES = (str, int, float, bool, list, dict, type(None))


def message_type_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


_adapters: dict[type, TypeAdapter[Any]] = {}


def _adapter(cls: type) -> TypeAdapter[Any]:
    adapter = _adapters.get(cls)
    if adapter is None:
        adapter = _adapters[cls] = TypeAdapter(cls)
    return adapter


class MessageTypeRegistry:
    """The message classes that may be read from a payload, by ``message_type_name``."""

    def __init__(self) -> None:
        self._types: dict[str, type] = {}

    def register(self, cls: type) -> type:
        if cls in _JSON_VALUES:
            return cls
        name = message_type_name(cls)
        known = self._types.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"two message classes are named {name!r}")
        self._types[name] = cls
        return cls

    def register_agent_class(self, agent_class: type) -> None:
        """Register what the ``@message_handler`` methods of ``agent_class`` take and return."""
        # Deferred: routed_agent imports the agent model, which must not import this module back.
        from agents.routed_agent import handler_message_types

        for cls in handler_message_types(agent_class):
            self.register(cls)

    def __contains__(self, cls: type) -> bool:
        return cls in _JSON_VALUES or self._types.get(message_type_name(cls)) is cls

    def encode(self, message: Any) -> dict[str, Any]:
        """``{"type", "data"}`` for a registered message class or a plain JSON value."""
        cls = type(message)
        if cls in _JSON_VALUES:
            return {"type": _JSON_TYPE, "data": message}
        if cls not in self:
            raise MessageSerializationError(
                f"{message_type_name(cls)} is not a registered message type: register the agent "
                "class that handles it, or the class itself with register_message_type"
            )
        try:
            data = _adapter(cls).dump_python(message, mode="json")
        except Exception as e:  # pydantic raises several kinds for values it cannot serialize
            raise MessageSerializationError(f"cannot serialize a {cls.__qualname__}: {e}") from e
        return {"type": message_type_name(cls), "data": data}

    def decode(self, payload: dict[str, Any]) -> Any:
        """The message ``encode`` wrote; its class must be registered here."""
        name = payload.get("type")
        if name == _JSON_TYPE:
            return payload.get("data")
        cls = self._types.get(str(name))
        if cls is None:
            raise MessageSerializationError(
                f"unknown message type {name!r}: import the module that registers it"
            )
        try:
            return _adapter(cls).validate_python(payload.get("data"))
        except ValidationError as e:
            raise MessageSerializationError(f"invalid {cls.__qualname__}: {e}") from e


default_message_types = MessageTypeRegistry()
