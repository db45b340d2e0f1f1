"""A user tool module, as named in ``TOKENMILL_TOOL_MODULES``: its tools register on import."""

from __future__ import annotations

from agents import tool


@tool
def word_count(text: str) -> int:
    """Count the words of a text."""
    return len(text.split())
