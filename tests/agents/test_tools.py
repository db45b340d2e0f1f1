"""Tools: schemas from signatures, argument validation, the registry, built-ins, user tool modules."""

from __future__ import annotations

import datetime
import threading
from typing import Annotated

import pytest
from pydantic import BaseModel

from agents import (
    FunctionTool,
    ToolArgumentsError,
    ToolError,
    ToolRegistry,
    UnknownToolError,
    current_time,
    default_registry,
    load_tool_modules,
    return_value_as_string,
)
from models import CancellationToken, Tool


def add(a: int, b: Annotated[int, "the second number"] = 1) -> int:
    return a + b


async def greet(name: str, *, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"


def which_thread() -> int:
    return threading.get_ident()


def sees_token(text: str, cancellation_token: CancellationToken) -> bool:
    return isinstance(cancellation_token, CancellationToken) and not cancellation_token.is_cancelled()


def test_schema_is_built_from_the_signature() -> None:
    tool = FunctionTool(add, "Add two numbers.")
    assert isinstance(tool, Tool)
    assert tool.name == "add"
    schema = tool.schema
    assert schema["name"] == "add"
    assert schema["description"] == "Add two numbers."
    parameters = schema["parameters"]
    assert parameters["type"] == "object"
    assert parameters["required"] == ["a"]
    assert parameters["properties"]["a"]["type"] == "integer"
    assert parameters["properties"]["b"]["description"] == "the second number"
    assert parameters["additionalProperties"] is False


async def test_sync_and_async_functions_run() -> None:
    assert await FunctionTool(add, "add").run_json({"a": 2, "b": 3}) == 5
    assert await FunctionTool(add, "add").run_json({"a": 2}) == 3
    assert await FunctionTool(greet, "greet", name="say_hello").run_json({"name": "ada"}) == "hello ada!"
    # A sync tool runs in a thread, never on the event loop's.
    assert await FunctionTool(which_thread, "thread").run_json({}) != threading.get_ident()


@pytest.mark.parametrize("args", [{"a": "not a number"}, {}, {"a": 1, "c": 2}])
async def test_arguments_failing_the_schema_raise(args: dict[str, object]) -> None:
    with pytest.raises(ToolArgumentsError):
        await FunctionTool(add, "add").run_json(args)


async def test_a_cancellation_token_parameter_is_hidden_and_passed() -> None:
    tool = FunctionTool(sees_token, "token")
    assert list(tool.schema["parameters"]["properties"]) == ["text"]
    assert await tool.run_json({"text": "x"}, cancellation_token=CancellationToken()) is True


def test_return_values_become_text() -> None:
    class Point(BaseModel):
        x: int

    assert return_value_as_string("plain") == "plain"
    assert return_value_as_string(Point(x=1)) == '{"x":1}'
    assert return_value_as_string({"a": [1, 2]}) == '{"a": [1, 2]}'
    assert return_value_as_string(datetime.date(2024, 1, 2)) == '"2024-01-02"'


def test_registry_names_are_unique_and_lookups_name_the_missing_tool() -> None:
    registry = ToolRegistry([FunctionTool(add, "add")])
    with pytest.raises(ValueError, match="already registered"):
        registry.register(FunctionTool(add, "another add"))
    registry.register(FunctionTool(add, "replacement"), replace=True)
    assert registry.get("add").schema["description"] == "replacement"
    with pytest.raises(UnknownToolError, match="nope"):
        registry.select(["add", "nope"])

    @registry.tool
    def shout(text: str) -> str:
        """Upper-case the text.

        More detail that is not part of the description."""
        return text.upper()

    assert registry.names() == ["add", "shout"]
    assert registry.get("shout").schema["description"] == "Upper-case the text."


def test_builtins_are_registered() -> None:
    assert {"calculator", "current_time"} <= set(default_registry.names())


def test_current_time_in_utc_and_in_a_named_zone() -> None:
    utc = datetime.datetime.fromisoformat(current_time())
    assert utc.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.UTC) - utc).total_seconds()) < 60
    tokyo = datetime.datetime.fromisoformat(current_time("Asia/Tokyo"))
    assert tokyo.utcoffset() == datetime.timedelta(hours=9)
    with pytest.raises(ToolError, match="Mars/Olympus"):
        current_time("Mars/Olympus")


async def test_user_tool_modules_register_on_import() -> None:
    load_tool_modules(["tests.agents.user_tools"])
    load_tool_modules(["tests.agents.user_tools"])  # a second import registers nothing twice
    assert await default_registry.get("word_count").run_json({"text": "one two three"}) == 3
    with pytest.raises(ToolError, match="no_such_module"):
        load_tool_modules(["tests.agents.no_such_module"])
