"""``RoutedAgent``: routes each message to the ``@message_handler`` method typed for its class."""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, Union, get_type_hints, overload

from agents.agent import BaseAgent
from agents.exceptions import CantHandleException
from agents.message_context import MessageContext

__all__ = ["RoutedAgent", "handler_message_types", "message_handler"]

AgentT = TypeVar("AgentT", bound=BaseAgent)
ReceivesT = TypeVar("ReceivesT")
ProducesT = TypeVar("ProducesT")

Handler = Callable[[AgentT, ReceivesT, MessageContext], Coroutine[Any, Any, ProducesT]]
MatchFunction = Callable[[Any, MessageContext], bool]

_TARGET_TYPES = "_tokenmill_target_types"
_ROUTER = "_tokenmill_router"


def _union_members(annotation: Any) -> tuple[type, ...]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members: tuple[type, ...] = ()
        for arg in typing.get_args(annotation):
            members += _union_members(arg)
        return members
    if typing.get_origin(annotation) is typing.Annotated:
        return _union_members(typing.get_args(annotation)[0])
    if isinstance(annotation, type):
        return (annotation,)
    raise TypeError(f"a message type must be a class or a union of classes, not {annotation!r}")


def _message_types(func: Callable[..., Any]) -> tuple[type, ...]:
    parameters = list(inspect.signature(func).parameters.values())
    if len(parameters) != 3:
        raise TypeError(f"{func.__qualname__}: a message handler takes (self, message, ctx)")
    try:
        hints = get_type_hints(func)
    except NameError as e:
        raise TypeError(
            f"{func.__qualname__}: cannot resolve its type hints ({e}); "
            "define message classes at module level"
        ) from e
    name = parameters[1].name
    if name not in hints:
        raise TypeError(f"{func.__qualname__}: the message parameter {name!r} needs a type hint")
    return _union_members(hints[name])


def _return_types(func: Callable[..., Any]) -> list[type]:
    try:
        annotation = get_type_hints(func).get("return")
    except NameError:
        return []
    try:
        members = _union_members(annotation)
    except TypeError:  # Any, a generic alias: nothing to register
        return []
    return [member for member in members if member is not type(None)]


def handler_message_types(agent_class: type) -> list[type]:
    """The classes the ``@message_handler`` methods of ``agent_class`` take and return (for
    runtimes that must serialize them)."""
    found: list[type] = []
    for cls in agent_class.__mro__:
        for attribute in vars(cls).values():
            target_types = getattr(attribute, _TARGET_TYPES, None)
            if target_types is None:
                continue
            found.extend(target_types)
            found.extend(_return_types(getattr(attribute, "__wrapped__", attribute)))
    return found


@overload
def message_handler(
    func: Handler[AgentT, ReceivesT, ProducesT], /
) -> Handler[AgentT, ReceivesT, ProducesT]: ...


@overload
def message_handler(
    func: None = None, /, *, strict: bool = True, match: MatchFunction | None = None
) -> Callable[[Handler[AgentT, ReceivesT, ProducesT]], Handler[AgentT, ReceivesT, ProducesT]]: ...


def message_handler(
    func: Handler[AgentT, ReceivesT, ProducesT] | None = None,
    /,
    *,
    strict: bool = True,
    match: MatchFunction | None = None,
) -> (
    Handler[AgentT, ReceivesT, ProducesT]
    | Callable[[Handler[AgentT, ReceivesT, ProducesT]], Handler[AgentT, ReceivesT, ProducesT]]
):
    """Mark an ``async def handler(self, message: T, ctx: MessageContext)`` method of a
    ``RoutedAgent`` as the handler of messages of class ``T`` (or of each class of a union).

    ``match(message, ctx)`` picks between several handlers of one class; the first that matches
    wins. ``strict`` is AutoGen's flag; type checks here are always strict.
    """
    del strict  # routing is by declared type; a message of another type never reaches a handler

    def decorate(f: Handler[AgentT, ReceivesT, ProducesT]) -> Handler[AgentT, ReceivesT, ProducesT]:
        if not inspect.iscoroutinefunction(f):
            raise TypeError(f"{f.__qualname__}: a message handler must be an async def")
        target_types = _message_types(f)

        @functools.wraps(f)
        async def wrapper(self: AgentT, message: ReceivesT, ctx: MessageContext) -> ProducesT:
            return await f(self, message, ctx)

        setattr(wrapper, _TARGET_TYPES, target_types)
        setattr(wrapper, _ROUTER, match or (lambda _message, _ctx: True))
        return wrapper

    return decorate(func) if func is not None else decorate


class RoutedAgent(BaseAgent):
    """AutoGen's ``RoutedAgent``: subclass it, write ``@message_handler`` methods, and each message
    goes to the handler typed for its class (or a base class of it); among several, the first
    defined whose ``match`` accepts it. A message no handler takes raises ``CantHandleException``
    to the sender."""

    def __init__(self, description: str) -> None:
        super().__init__(description)
        self._handlers: dict[type, list[Callable[[Any, MessageContext], Coroutine[Any, Any, Any]]]] = {}
        # Definition order, a subclass's handlers before its bases'; an override replaces.
        seen: set[str] = set()
        for cls in type(self).__mro__:
            for name, attribute in vars(cls).items():
                if name in seen:
                    continue
                seen.add(name)
                target_types = getattr(attribute, _TARGET_TYPES, None)
                if target_types is None:
                    continue
                bound = getattr(self, name)
                for target in target_types:
                    self._handlers.setdefault(target, []).append(bound)

    async def on_message_impl(self, message: Any, ctx: MessageContext) -> Any:
        for cls in type(message).__mro__:
            for handler in self._handlers.get(cls, ()):
                if getattr(handler, _ROUTER)(message, ctx):
                    return await handler(message, ctx)
        return await self.on_unhandled_message(message, ctx)

    async def on_unhandled_message(self, message: Any, ctx: MessageContext) -> Any:
        raise CantHandleException(
            f"{type(self).__name__} ({self.id}) has no handler for {type(message).__name__}"
        )
