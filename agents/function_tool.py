"""``FunctionTool``: a Python function (sync or async) offered to a model as a tool.

The JSON schema of its arguments is built from the signature with pydantic, and arguments a model
writes are validated against the same pydantic model before the function is called. A parameter
annotated ``Annotated[T, "text"]`` gets "text" as its description (AutoGen's convention); a
parameter named ``cancellation_token`` of type ``CancellationToken`` is not shown to the model and
receives the run's token.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Annotated, Any, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from agents.exceptions import ToolArgumentsError
from models.cancellation import CancellationToken
from models.types import ToolSchema

__all__ = ["FunctionTool", "return_value_as_string"]


def _args_model(func: Callable[..., Any], name: str) -> tuple[type[BaseModel], bool]:
    """The pydantic model of ``func``'s arguments, and whether it takes a cancellation token."""
    signature = inspect.signature(func)
    try:
        hints = get_type_hints(func, include_extras=True)
    except NameError as e:
        raise TypeError(f"cannot resolve the type hints of tool {name!r}: {e}") from e
    fields: dict[str, Any] = {}
    takes_token = False
    for parameter in signature.parameters.values():
        if parameter.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TypeError(f"tool {name!r}: *args and **kwargs cannot be described to a model")
        annotation = hints.get(parameter.name, Any)
        if parameter.name == "cancellation_token" and annotation is CancellationToken:
            takes_token = True
            continue
        description: str | None = None
        if get_origin(annotation) is Annotated:
            base, *metadata = get_args(annotation)
            texts = [item for item in metadata if isinstance(item, str)]
            if texts:
                description = texts[0]
                annotation = base
        default = ... if parameter.default is inspect.Parameter.empty else parameter.default
        fields[parameter.name] = (annotation, Field(default, description=description))
    model = create_model(f"{name}_args", __config__=ConfigDict(extra="forbid"), **fields)
    return model, takes_token


def return_value_as_string(value: Any) -> str:
    """How a tool's return value is shown to the model."""
    if isinstance(value, str):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json()
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


class FunctionTool:
    """A function as a tool: ``name``, ``description``, ``schema`` and ``run_json(args)``
    (``models.types.Tool``). Sync functions run in a thread so they never block the event loop."""

    def __init__(
        self, func: Callable[..., Any], description: str, name: str | None = None, *, strict: bool = False
    ) -> None:
        self._func = func
        self._name = name or func.__name__
        self._description = description
        self._args_type, self._takes_token = _args_model(func, self._name)
        parameters = self._args_type.model_json_schema()
        parameters.pop("title", None)
        self._schema = ToolSchema(name=self._name, description=description, parameters=parameters)
        if strict:
            self._schema["strict"] = True

    @property
    def name(self) -> str:
        return self._name

    @property
    def description(self) -> str:
        return self._description

    @property
    def schema(self) -> ToolSchema:
        return self._schema

    @property
    def args_type(self) -> type[BaseModel]:
        return self._args_type

    async def run_json(
        self, args: Mapping[str, Any], cancellation_token: CancellationToken | None = None
    ) -> Any:
        """Validate ``args`` against the schema, call the function, return what it returned.

        Raises ``ToolArgumentsError`` for arguments that fail the schema; whatever the function
        raises propagates.
        """
        try:
            validated = self._args_type.model_validate(dict(args))
        except ValidationError as e:
            raise ToolArgumentsError(f"invalid arguments for {self._name}: {e}") from e
        kwargs = {field: getattr(validated, field) for field in type(validated).model_fields}
        if self._takes_token:
            kwargs["cancellation_token"] = cancellation_token or CancellationToken()
        if inspect.iscoroutinefunction(self._func):
            return await self._func(**kwargs)
        return await asyncio.to_thread(self._func, **kwargs)

    def __repr__(self) -> str:
        return f"FunctionTool(name={self._name!r})"
