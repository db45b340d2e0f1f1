"""Token estimates for count_tokens and the rate limiter."""

from __future__ import annotations

from models import (
    AssistantMessage,
    FunctionCall,
    Image,
    LLMMessage,
    SystemMessage,
    ToolSchema,
    UserMessage,
    count_text_tokens,
    estimate_tokens,
    messages_from_openai,
    to_openai_messages,
)

TOOL: ToolSchema = {"name": "lookup", "description": "Look a word up.", "parameters": {"type": "object"}}


def test_text_tokens_use_a_real_encoding() -> None:
    assert count_text_tokens("") == 0
    assert count_text_tokens("hello world") == 2  # cl100k_base, not the len/4 heuristic (3)
    long = "tokenization " * 200
    assert 150 < count_text_tokens(long) < 700


def test_estimates_grow_with_content_and_agree_across_forms() -> None:
    short: list[LLMMessage] = [UserMessage(content="hi", source="user")]
    longer: list[LLMMessage] = [
        SystemMessage(content="You are terse."),
        UserMessage(content="hi " * 50, source="user"),
    ]
    assert 0 < estimate_tokens(short) < estimate_tokens(longer)
    assert estimate_tokens(short, [TOOL]) > estimate_tokens(short)
    low: list[LLMMessage] = [
        UserMessage(content=["see", Image(url="https://x/y.png", detail="low")], source="user")
    ]
    high: list[LLMMessage] = [
        UserMessage(content=["see", Image(url="https://x/y.png", detail="high")], source="user")
    ]
    assert estimate_tokens(high) - estimate_tokens(low) == 765 - 85
    conversation: list[LLMMessage] = [
        SystemMessage(content="sys"),
        UserMessage(content="question", source="bob"),
        AssistantMessage(content=[FunctionCall(id="1", name="lookup", arguments='{"w":"x"}')]),
    ]
    as_openai = to_openai_messages(conversation)
    assert estimate_tokens(conversation, [TOOL]) == estimate_tokens(
        as_openai, [{"type": "function", "function": TOOL}]
    )
    read = messages_from_openai(as_openai)
    assert read[1].model_copy(update={"openai_message": None}) == conversation[1]
    assert estimate_tokens(read, [TOOL]) == estimate_tokens(
        as_openai, [{"type": "function", "function": TOOL}]
    )


def test_fields_passed_verbatim_are_counted_for_the_rate_limiter() -> None:
    """Fields the provider receives as the caller wrote them (a legacy ``function_call``, a custom
    tool call's ``input``, ``refusal``, a server's own fields) used to count nothing: a 200 KB
    ``function_call`` was estimated at a few tokens and rode past the tpm limit."""
    big = "x " * 100_000
    plain = estimate_tokens([{"role": "assistant", "content": None}])
    for message in (
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": big}},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c", "type": "custom", "custom": {"name": "g", "input": big}}],
        },
        {"role": "assistant", "content": None, "refusal": big},
        {"role": "user", "content": "hi", "vendor_field": {"blob": big}},
    ):
        assert estimate_tokens([message]) > plain + 50_000, message
