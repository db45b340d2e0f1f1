"""The tools agents may call: a registry, the safe built-ins, and the user's own tools.

User tools live in modules named in ``Settings.tool_modules`` (``TOKENMILL_TOOL_MODULES``); a
worker imports them with ``load_tool_modules``, and they register themselves on import::

    from agents import tool

    @tool
    async def lookup_order(order_id: str) -> dict[str, str]:
        \"\"\"Find an order by its id.\"\"\"
        ...
"""

from __future__ import annotations

import datetime
import importlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Annotated, Any, TypeVar, overload
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from agents.calculator import evaluate
from agents.exceptions import ToolError, UnknownToolError
from agents.function_tool import FunctionTool
from models.types import Tool

__all__ = [
    "FunctionTool",
    "ToolRegistry",
    "calculator",
    "current_time",
    "default_registry",
    "load_tool_modules",
    "tool",
]

FuncT = TypeVar("FuncT", bound=Callable[..., Any])


def _doc_summary(func: Callable[..., Any]) -> str:
    doc = inspect.getdoc(func) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ").strip()


class ToolRegistry:
    """Tools by name. Names are unique: registering a second tool under a taken name is an error
    unless ``replace=True``, so two modules cannot silently shadow each other."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for item in tools:
            self.register(item)

    def register(self, tool: Tool, *, replace: bool = False) -> Tool:
        if not replace and tool.name in self._tools and self._tools[tool.name] is not tool:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool
        return tool

    @overload
    def tool(self, func: FuncT, /) -> FuncT: ...

    @overload
    def tool(
        self, func: None = None, /, *, name: str | None = None, description: str | None = None
    ) -> Callable[[FuncT], FuncT]: ...

    def tool(
        self, func: FuncT | None = None, /, *, name: str | None = None, description: str | None = None
    ) -> FuncT | Callable[[FuncT], FuncT]:
        """Decorator: register ``func`` as a ``FunctionTool`` (its docstring's first paragraph is the
        description unless one is given) and return it unchanged."""

        def decorate(f: FuncT) -> FuncT:
            self.register(FunctionTool(f, description or _doc_summary(f), name=name))
            return f

        return decorate(func) if func is not None else decorate

    def get(self, name: str) -> Tool:
        try:
            return self._tools[name]
        except KeyError as e:
            raise UnknownToolError(f"no tool named {name!r}; known: {', '.join(sorted(self._tools))}") from e

    def select(self, names: Sequence[str]) -> list[Tool]:
        """The tools with these names, in order; ``UnknownToolError`` names the first unknown one."""
        return [self.get(name) for name in names]

    def names(self) -> list[str]:
        return sorted(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool]:
        return iter(list(self._tools.values()))

    def __len__(self) -> int:
        return len(self._tools)


def calculator(
    expression: Annotated[str, "An arithmetic expression: numbers, parentheses, + - * / // % **"],
) -> str:
    """Evaluate an arithmetic expression exactly (integers stay integers) and return its value."""
    return str(evaluate(expression))


def current_time(
    timezone: Annotated[str | None, "An IANA time zone name such as 'Europe/Paris'; UTC if omitted"] = None,
) -> str:
    """The current date and time in ISO 8601, in UTC or in the given time zone."""
    now = datetime.datetime.now(datetime.UTC)
    if timezone is None:
        return now.isoformat()
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ToolError(f"unknown time zone {timezone!r}") from e
    return now.astimezone(zone).isoformat()


default_registry = ToolRegistry(
    [
        FunctionTool(calculator, _doc_summary(calculator)),
        FunctionTool(current_time, _doc_summary(current_time)),
    ]
)
"""The process-wide registry: the built-ins plus every tool registered with ``@tool``."""

tool = default_registry.tool


def load_tool_modules(module_names: Iterable[str]) -> None:
    """Import the modules holding user tools (``Settings.tool_modules``); they register themselves
    in ``default_registry`` on import, and importing twice registers nothing twice."""
    for module_name in module_names:
        try:
            importlib.import_module(module_name)
        except ImportError as e:
            raise ToolError(f"cannot import tool module {module_name!r}: {e}") from e
