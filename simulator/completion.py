"""From an OpenAI chat-completions request body to a deterministic reply (``chat.completion`` or chunks)."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from simulator.directives import Directives, ToolCallDirective, parse_directives
from simulator.errors import ApiError
from simulator.schema_instance import schema_instance
from simulator.text import count_tokens, request_digest, rng_for, words

__all__ = ["ChatRequest", "Choice", "Reply", "ToolCall", "build_reply", "parse_request", "reply_chunks"]

# What makes two requests "the same": the parts that shape the answer (not stream, limits, or metadata).
_DIGEST_KEYS = ("model", "messages", "tools", "tool_choice", "response_format", "parallel_tool_calls", "seed")
_MESSAGE_OVERHEAD_TOKENS = 4
_REPLY_PRIMING_TOKENS = 3


@dataclass
class ChatRequest:
    """A validated request body plus what the simulator reads from it."""

    body: dict[str, Any]
    model: str
    messages: list[dict[str, Any]]
    n: int
    stream: bool
    include_usage: bool
    max_tokens: int | None
    directives: Directives
    digest: bytes
    prompt_tokens: int


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # a custom tool's: its input
    kind: str = "function"  # or "custom": OpenAI's free-form tools

    def fields(self) -> tuple[str, str]:
        """The call's object key and its arguments' key, by its kind."""
        return ("custom", "input") if self.kind == "custom" else ("function", "arguments")

    def to_json(self) -> dict[str, Any]:
        field_name, arguments_name = self.fields()
        return {
            "id": self.id,
            "type": self.kind,
            field_name: {"name": self.name, arguments_name: self.arguments},
        }


@dataclass
class Choice:
    index: int
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    completion_tokens: int = 0
    logprobs: dict[str, Any] | None = None
    refusal: str | None = None


@dataclass
class Reply:
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": self.reasoning_tokens,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    def to_json(self) -> dict[str, Any]:
        choices = []
        for choice in self.choices:
            message: dict[str, Any] = {"role": "assistant", "content": choice.content}
            message["refusal"] = choice.refusal
            if choice.tool_calls:
                message["tool_calls"] = [c.to_json() for c in choice.tool_calls]
            choices.append(
                {
                    "index": choice.index,
                    "message": message,
                    "logprobs": choice.logprobs,
                    "finish_reason": choice.finish_reason,
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
            "system_fingerprint": self.system_fingerprint,
            "service_tier": "default",
        }


def message_text(message: dict[str, Any]) -> str:
    """The text of a message: a string content, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _optional_int(body: dict[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _bad_request(f"Invalid '{key}': expected an integer >= {minimum}, got {value!r}.", key)
    return value


def parse_request(body: Any) -> ChatRequest:
    """Validate the parts of the body the simulator relies on, read directives, estimate prompt tokens."""
    if not isinstance(body, dict):
        raise _bad_request("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad_request("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad_request("Invalid 'messages': expected a non-empty array.", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad_request(
                f"Invalid 'messages[{index}]': expected an object with a role.", f"messages[{index}]"
            )
    n = _optional_int(body, "n", 1) or 1
    if n > 128:
        raise _bad_request("Invalid 'n': must be at most 128.", "n")
    max_tokens = _optional_int(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1)
    last_user = next((m for m in reversed(messages) if m["role"] == "user"), None)
    directives = parse_directives(message_text(last_user)) if last_user is not None else Directives()
    stream_options = body.get("stream_options") or {}
    prompt_tokens = _REPLY_PRIMING_TOKENS + sum(
        _MESSAGE_OVERHEAD_TOKENS + count_tokens(message_text(m) + json.dumps(m.get("tool_calls") or ""))
        for m in messages
    )
    if body.get("tools"):
        prompt_tokens += count_tokens(json.dumps(body["tools"]))
    return ChatRequest(
        body=body,
        model=model,
        messages=messages,
        n=n,
        stream=bool(body.get("stream")),
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
        max_tokens=max_tokens,
        directives=directives,
        digest=request_digest({key: body.get(key) for key in _DIGEST_KEYS}),
        prompt_tokens=prompt_tokens,
    )


def build_reply(
    request: ChatRequest, *, reply_words: int | None = None, answered_model_suffix: str = ""
) -> Reply:
    """The deterministic reply to ``request`` (faults and latency are the server's business, not
    this); the model it names is the one asked for, ``answered_model_suffix`` added."""
    directives = request.directives
    calls = _tool_calls_due(request)
    choices: list[Choice] = []
    for index in range(request.n):
        if calls:
            choice = Choice(index, None, list(calls), "tool_calls")
            choice.completion_tokens = sum(count_tokens(c.name + c.arguments) for c in calls)
        elif directives.refusal is not None:
            choice = Choice(index, None, refusal=directives.refusal)
            choice.completion_tokens = count_tokens(directives.refusal)
        else:
            content = _content(request, index, reply_words)
            choice = Choice(index, content, finish_reason="stop", completion_tokens=count_tokens(content))
        _apply_limits(request, choice)
        if request.body.get("logprobs") and choice.content is not None:
            choice.logprobs = _logprobs(choice.content, request.body.get("top_logprobs") or 0)
        choices.append(choice)
    completion_tokens = sum(c.completion_tokens for c in choices) + directives.reasoning_tokens
    return Reply(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=request.model + answered_model_suffix,
        system_fingerprint="fp_" + hashlib.sha256(request.model.encode()).hexdigest()[:10],
        choices=choices,
        prompt_tokens=request.prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=min(directives.cached_tokens, request.prompt_tokens),
        reasoning_tokens=directives.reasoning_tokens,
    )


def _offered_tools(body: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """The tools offered, by name: their kind ("function" or "custom") and definition."""
    tools: dict[str, tuple[str, dict[str, Any]]] = {}
    for tool in body.get("tools") or []:
        kind = tool.get("type", "function") if isinstance(tool, dict) else None
        function = tool.get(kind) if isinstance(tool, dict) and kind in ("function", "custom") else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            tools[function["name"]] = (str(kind), function)
    return tools


def _named_choice(tool_choice: dict[str, Any], tools: dict[str, tuple[str, dict[str, Any]]]) -> str | None:
    """The tool a ``tool_choice`` object makes the model call: a function or custom tool named,
    or ``allowed_tools`` in mode "required" (the first allowed one offered)."""
    kind = tool_choice.get("type")
    if kind in ("function", "custom"):
        name = (tool_choice.get(kind) or {}).get("name")
        return name if isinstance(name, str) else None
    allowed = tool_choice.get("allowed_tools") or {}
    if kind == "allowed_tools" and allowed.get("mode") == "required":
        for tool in allowed.get("tools") or []:
            name = (tool.get(tool.get("type")) or {}).get("name") if isinstance(tool, dict) else None
            if name in tools:
                return str(name)
    return None


def _tail_after_last_user(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return messages[last_user + 1 :]


def _tool_calls_due(request: ChatRequest) -> list[ToolCall]:
    body = request.body
    tools = _offered_tools(body)
    tool_choice = body.get("tool_choice", "auto")
    if not tools or tool_choice == "none":
        return []
    rounds = request.directives.rounds
    if body.get("parallel_tool_calls") is False:
        rounds = [[call] for group in rounds for call in group]
    rounds_done = sum(
        1 for m in _tail_after_last_user(request.messages) if m["role"] == "assistant" and m.get("tool_calls")
    )
    due: list[ToolCallDirective] = []
    if rounds_done < len(rounds):
        due = rounds[rounds_done]
    elif rounds_done == 0 and not rounds:
        if isinstance(tool_choice, dict):
            name = _named_choice(tool_choice, tools)
            if name is not None:
                due = [ToolCallDirective(name, None)]
        elif tool_choice == "required":
            due = [ToolCallDirective(next(iter(tools)), None)]
    calls = []
    for index, directive in enumerate(due):
        kind, definition = tools.get(directive.name, ("function", {}))
        arguments = directive.arguments
        if arguments is None and kind == "custom":
            arguments = " ".join(words(rng_for(request.digest, "input", index), 6))
        elif arguments is None:
            schema = definition.get("parameters") or {"type": "object", "properties": {}}
            value = schema_instance(schema, rng_for(request.digest, "args", index))
            arguments = json.dumps(value, separators=(",", ":"))
        call_id = "call_" + hashlib.sha256(request.digest + f"call:{index}".encode()).hexdigest()[:24]
        calls.append(ToolCall(call_id, directive.name, arguments, kind))
    return calls


def _content(request: ChatRequest, index: int, reply_words: int | None) -> str:
    directives = request.directives
    rng = rng_for(request.digest, index)
    response_format = request.body.get("response_format") or {}
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_schema":
        json_schema = response_format.get("json_schema") or {}
        schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
        return json.dumps(schema_instance(schema or {"type": "object"}, rng))
    parts = list(directives.say)
    results = _tool_results(request.messages)
    if results:
        parts.append("tool results: " + "; ".join(f"{name}={content}" for name, content in results))
    if directives.recall:
        parts.append("recall: " + " | ".join(_earlier_texts(request.messages)))
    if directives.echo:
        parts.append("messages: " + json.dumps(request.messages, sort_keys=True, separators=(",", ":")))
    if not parts:
        count = directives.words or reply_words or rng.randint(8, 40)
        parts.append(" ".join(words(rng, count)).capitalize() + ".")
    text = "\n".join(parts)
    if kind == "json_object":
        return json.dumps({"reply": text})
    return text


def _tool_results(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    names: dict[str, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or []:
            named = call.get(call.get("type", "function")) if isinstance(call, dict) else None
            if isinstance(named, dict):
                names[str(call.get("id"))] = str(named.get("name"))
    return [
        (names.get(str(m.get("tool_call_id")), str(m.get("name") or "tool")), message_text(m))
        for m in _tail_after_last_user(messages)
        if m["role"] == "tool"
    ]


def _earlier_texts(messages: list[dict[str, Any]]) -> list[str]:
    texts = []
    for message in messages:
        if message["role"] in ("assistant", "tool"):
            text = message_text(message)
            if text:
                texts.append(text)
    return texts


def _apply_limits(request: ChatRequest, choice: Choice) -> None:
    stops = request.body.get("stop")
    if isinstance(stops, str):
        stops = [stops]
    if choice.content is not None and isinstance(stops, list):
        cut = min(
            (choice.content.find(s) for s in stops if isinstance(s, str) and s and s in choice.content),
            default=-1,
        )
        if cut >= 0:
            choice.content = choice.content[:cut]
            choice.completion_tokens = count_tokens(choice.content)
    limit = request.max_tokens
    if limit is None or choice.completion_tokens <= limit:
        return
    choice.finish_reason = "length"
    choice.completion_tokens = limit
    if choice.content is not None:
        choice.content = choice.content[: limit * 4]
    budget = limit * 4
    for call in choice.tool_calls:
        call.arguments = call.arguments[: max(0, budget - len(call.name))]
        budget = max(0, budget - len(call.name) - len(call.arguments))


def _logprobs(content: str, top: int) -> dict[str, Any]:
    tokens = [content[i : i + 4] for i in range(0, len(content), 4)]
    entries = []
    for position, token in enumerate(tokens):
        logprob = -round(0.01 + (position % 7) * 0.05, 4)
        alternatives = [{"token": token, "logprob": logprob, "bytes": list(token.encode())}]
        alternatives += [
            {"token": f"<alt{k}>", "logprob": logprob - k, "bytes": list(f"<alt{k}>".encode())}
            for k in range(1, top)
        ]
        entries.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode()),
                "top_logprobs": alternatives[:top],
            }
        )
    return {"content": entries, "refusal": None}


# ``[[content_parts image]]``: a part that is no text (a 1x1 PNG), as a multimodal server may send.
IMAGE_PART: dict[str, Any] = {
    "type": "image_url",
    "image_url": {
        "url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
        "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
    },
}


def content_parts(text: str, mode: str, *, last: bool = True, first: bool = True) -> list[dict[str, Any]]:
    """``text`` as a list of content parts (``[[content_parts MODE]]``): cut after each space, in
    at most three parts; "image" puts ``IMAGE_PART`` after the first text part (of the ``first``
    piece), "bad" makes the ``last`` piece's last part's ``text`` a number, "empty" is no part at all
    (``content: []``: a provider that answered nothing, in parts)."""
    if mode == "empty":
        return []
    words = text.split(" ")
    cut = max(1, -(-len(words) // 3))
    pieces = [" ".join(words[i : i + cut]) for i in range(0, len(words), cut)]
    pieces = [piece + (" " if i < len(pieces) - 1 else "") for i, piece in enumerate(pieces)]
    parts: list[dict[str, Any]] = [{"type": "text", "text": piece} for piece in pieces if piece]
    if mode == "image" and first:
        parts.insert(1, IMAGE_PART)
    if mode == "bad" and last and parts:
        parts[-1] = {"type": "text", "text": 42}
    return parts


def with_content_parts(chunks: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Stream chunks whose text deltas are lists of content parts (``[[content_parts MODE]]``)."""
    with_text = [
        i
        for i, chunk in enumerate(chunks)
        if any(
            isinstance(c.get("delta", {}).get("content"), str) and c["delta"]["content"]
            for c in chunk["choices"]
        )
    ]
    out = []
    for i, chunk in enumerate(chunks):
        if i in with_text:
            choices = []
            for choice in chunk["choices"]:
                delta = dict(choice["delta"])
                if delta.get("content"):
                    delta["content"] = content_parts(
                        delta["content"], mode, first=i == with_text[0], last=i == with_text[-1]
                    )
                choices.append({**choice, "delta": delta})
            chunk = {**chunk, "choices": choices}
        out.append(chunk)
    return out


def reply_chunks(
    reply: Reply, *, include_usage: bool, chunk_chars: int, empty_chunks: bool
) -> Iterator[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a streamed reply, in order, as OpenAI sends them."""
    head = {
        "id": reply.id,
        "object": "chat.completion.chunk",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": reply.system_fingerprint,
    }
    if include_usage:
        head["usage"] = None
    toggle = False

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**head, "choices": choices}

    def filler() -> dict[str, Any]:
        nonlocal toggle
        toggle = not toggle
        return chunk([] if toggle else [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": None}])

    for choice in reply.choices:
        deltas: list[dict[str, Any]] = []
        if choice.tool_calls:
            deltas.append({"role": "assistant", "content": None, "refusal": None})
            for position, call in enumerate(choice.tool_calls):
                field_name, arguments_name = call.fields()
                deltas.append(
                    {
                        "tool_calls": [
                            {
                                "index": position,
                                "id": call.id,
                                "type": call.kind,
                                field_name: {"name": call.name, arguments_name: ""},
                            }
                        ]
                    }
                )
                for start in range(0, len(call.arguments), chunk_chars):
                    piece = call.arguments[start : start + chunk_chars]
                    deltas.append({"tool_calls": [{"index": position, field_name: {arguments_name: piece}}]})
        elif choice.refusal is not None:
            deltas.append({"role": "assistant", "content": None, "refusal": ""})
            refusal = choice.refusal
            deltas += [{"refusal": refusal[i : i + chunk_chars]} for i in range(0, len(refusal), chunk_chars)]
        else:
            content = choice.content or ""
            deltas.append({"role": "assistant", "content": "", "refusal": None})
            deltas += [{"content": content[i : i + chunk_chars]} for i in range(0, len(content), chunk_chars)]
        # Asked for, each text chunk carries the logprobs of the tokens it starts (as OpenAI's do).
        tokens = (choice.logprobs or {}).get("content") or []
        sent = 0
        for delta in deltas:
            logprobs = None
            if tokens and delta.get("content"):
                upto = sent + len(delta["content"])
                logprobs = {"content": tokens[-(-sent // 4) : -(-upto // 4)], "refusal": None}
                sent = upto
            choices = [{"index": choice.index, "delta": delta, "logprobs": logprobs, "finish_reason": None}]
            yield chunk(choices)
            if empty_chunks:
                yield filler()
        yield chunk(
            [{"index": choice.index, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}]
        )
    if include_usage:
        yield {**head, "choices": [], "usage": reply.usage()}
