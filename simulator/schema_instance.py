"""A deterministic JSON value that validates against a JSON Schema (the subset structured outputs use).

Covers what pydantic emits: objects with properties (all of them filled), ``$defs``/``$ref``,
``anyOf``/``oneOf`` (the first non-null branch), ``allOf``, ``enum``/``const``, strings (formats, lengths),
numbers and integers (bounds, ``multipleOf``), booleans, arrays (``minItems``/``maxItems``, ``prefixItems``),
maps (``additionalProperties``).
Recursive schemas stop at a depth where they take the smallest valid value.
"""

from __future__ import annotations

import math
import random
from typing import Any

from simulator.text import words

__all__ = ["schema_instance"]

_MAX_DEPTH = 6
_FORMATS = {
    "date-time": "2024-01-02T03:04:05Z",
    "date": "2024-01-02",
    "time": "03:04:05",
    "email": "sim@example.com",
    "uri": "https://example.com/sim",
    "url": "https://example.com/sim",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "hostname": "example.com",
    "duration": "P1D",
}


def schema_instance(schema: dict[str, Any], rng: random.Random) -> Any:
    """An instance of ``schema``; the same schema and ``rng`` state give the same instance."""
    return _Builder(schema, rng).build(schema, 0)


class _Builder:
    def __init__(self, root: dict[str, Any], rng: random.Random) -> None:
        self.root = root
        self.rng = rng

    def resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#"):
            return {}
        node: Any = self.root
        for part in ref.lstrip("#").strip("/").split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return {}
            node = node[part]
        return node if isinstance(node, dict) else {}

    def build(self, schema: Any, depth: int) -> Any:
        if not isinstance(schema, dict):
            return None if schema is False else "sim"
        if "$ref" in schema:
            merged = {**self.resolve(schema["$ref"]), **{k: v for k, v in schema.items() if k != "$ref"}}
            return self.build(merged, depth + 1)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return self.rng.choice(list(schema["enum"]))
        for key in ("anyOf", "oneOf"):
            if schema.get(key):
                return self.build(self.pick_branch(schema[key], depth), depth + 1)
        if "allOf" in schema:
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part["$ref"]) if isinstance(part, dict) and "$ref" in part else part
                if isinstance(part, dict):
                    merged = _merge(merged, part)
            return self.build(merged, depth + 1)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"] or ["null"]
            kind = kinds[0] if depth < _MAX_DEPTH or "null" not in kind else "null"
        if kind is None:
            if "properties" in schema or "additionalProperties" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                kind = "string"
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, depth)
        if kind == "string":
            return self.string(schema)
        if kind == "integer":
            return self.integer(schema)
        if kind == "number":
            return self.number(schema)
        if kind == "boolean":
            return self.rng.random() < 0.5
        return None

    def pick_branch(self, branches: list[Any], depth: int) -> Any:
        def is_null(branch: Any) -> bool:
            return isinstance(branch, dict) and branch.get("type") == "null"

        if depth >= _MAX_DEPTH:
            for branch in branches:
                if is_null(branch):
                    return branch
        for branch in branches:
            if not is_null(branch):
                return branch
        return branches[0]

    def object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties: dict[str, Any] = schema.get("properties") or {}
        required = set(schema.get("required") or [])
        result: dict[str, Any] = {}
        for name, subschema in properties.items():
            # Past the depth limit only what is required, so recursive models end.
            if depth < _MAX_DEPTH or name in required:
                result[name] = self.build(subschema, depth + 1)
        extra = schema.get("additionalProperties")
        if not properties and isinstance(extra, dict) and depth < _MAX_DEPTH:
            minimum = int(schema.get("minProperties", 1))
            for index in range(max(1, minimum)):
                result[f"key{index}"] = self.build(extra, depth + 1)
        return result

    def array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        if isinstance(prefix, list):
            return [self.build(item, depth + 1) for item in prefix]
        minimum = int(schema.get("minItems", 0))
        maximum = int(schema.get("maxItems", max(minimum, 3)))
        count = (
            minimum
            if depth >= _MAX_DEPTH
            else self.rng.randint(min(max(minimum, 1), maximum), min(maximum, 3))
        )
        count = max(count, minimum)
        items = schema.get("items", {})
        built = [self.build(items, depth + 1) for _ in range(count)]
        if schema.get("uniqueItems"):
            built = _unique(built, items, self, depth)
        return built

    def string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return _FORMATS[fmt]
        minimum = int(schema.get("minLength", 0))
        maximum = int(schema.get("maxLength", 10_000))
        text = " ".join(words(self.rng, self.rng.randint(1, 4)))
        while len(text) < minimum:
            text += " " + " ".join(words(self.rng, 4))
        return text[:maximum]

    def integer(self, schema: dict[str, Any]) -> int:
        low, high = _bounds(schema, integer=True)
        step = schema.get("multipleOf")
        if isinstance(step, int) and step > 0:
            first = math.ceil(low / step) * step
            count = max(0, (high - first) // step)
            return int(first + step * self.rng.randint(0, min(count, 100)))
        return self.rng.randint(int(low), int(high))

    def number(self, schema: dict[str, Any]) -> float | int:
        low, high = _bounds(schema, integer=False)
        step = schema.get("multipleOf")
        if isinstance(step, int | float) and step > 0:
            first, last = math.ceil(low / step), math.floor(high / step)
            value: float = self.rng.randint(first, max(first, last)) * step
            return int(value) if float(step).is_integer() else value
        return round(low + (high - low) * self.rng.random(), 3) if high > low else float(low)


def _bounds(schema: dict[str, Any], *, integer: bool) -> tuple[Any, Any]:
    """The closed range a number may take; 1000 wide where the schema leaves a side open."""
    epsilon = 1 if integer else 1e-3
    low: float | None = schema.get("minimum")
    high: float | None = schema.get("maximum")
    if "exclusiveMinimum" in schema:
        low = schema["exclusiveMinimum"] + epsilon
    if "exclusiveMaximum" in schema:
        high = schema["exclusiveMaximum"] - epsilon
    if low is None and high is None:
        low, high = 0, 1000
    elif low is None:
        assert high is not None
        low = high - 1000
    elif high is None:
        high = low + 1000
    if integer:
        return math.ceil(low), math.floor(high)
    return low, high


def _merge(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in part.items():
        if key == "properties":
            merged["properties"] = {**merged.get("properties", {}), **value}
        elif key == "required":
            merged["required"] = sorted({*merged.get("required", []), *value})
        else:
            merged.setdefault(key, value)
    return merged


def _unique(built: list[Any], items: Any, builder: _Builder, depth: int) -> list[Any]:
    seen: list[Any] = []
    for value in built:
        attempts = 0
        while value in seen and attempts < 20:
            value = builder.build(items, depth + 1)
            attempts += 1
        if value not in seen:
            seen.append(value)
    return seen
