"""What known models can do, and the permissive default for the rest.

An unknown model name (a vLLM, llama.cpp or Ollama model, a new release) gets ``PERMISSIVE_MODEL_INFO``:
every capability on, a 128k context window, family ``unknown``. The server is then the judge of what
it supports; pass ``model_info=`` to the client to be stricter or to set the real context window.
"""

from __future__ import annotations

from models.types import ModelFamily, ModelInfo

__all__ = ["PERMISSIVE_MODEL_INFO", "resolve_model_info"]

PERMISSIVE_MODEL_INFO: ModelInfo = {
    "vision": True,
    "function_calling": True,
    "json_output": True,
    "structured_output": True,
    "family": ModelFamily.UNKNOWN,
    "context_window": 128_000,
}


def _info(family: str, context_window: int, *, vision: bool = True, structured: bool = True) -> ModelInfo:
    return {
        "vision": vision,
        "function_calling": True,
        "json_output": True,
        "structured_output": structured,
        "family": family,
        "context_window": context_window,
    }


# Longest prefix wins, so "gpt-4o-mini" is found before "gpt-4o" and dated snapshots
# ("gpt-4o-2024-08-06") match their base name.
_BY_PREFIX: dict[str, ModelInfo] = {
    "gpt-4o-mini": _info(ModelFamily.GPT_4O, 128_000),
    "gpt-4o": _info(ModelFamily.GPT_4O, 128_000),
    "gpt-4.1-nano": _info(ModelFamily.GPT_41, 1_047_576),
    "gpt-4.1-mini": _info(ModelFamily.GPT_41, 1_047_576),
    "gpt-4.1": _info(ModelFamily.GPT_41, 1_047_576),
    "gpt-5-nano": _info(ModelFamily.GPT_5, 400_000),
    "gpt-5-mini": _info(ModelFamily.GPT_5, 400_000),
    "gpt-5": _info(ModelFamily.GPT_5, 400_000),
    "o1-mini": _info(ModelFamily.O1, 128_000, vision=False, structured=False),
    "o1": _info(ModelFamily.O1, 200_000),
    "o3-mini": _info(ModelFamily.O3, 200_000, vision=False),
    "o3": _info(ModelFamily.O3, 200_000),
    "o4-mini": _info(ModelFamily.O4, 200_000),
    "gemini-1.5-flash": _info(ModelFamily.GEMINI_1_5_FLASH, 1_048_576),
    "gemini-1.5-pro": _info(ModelFamily.GEMINI_1_5_PRO, 2_097_152),
    "gemini-2.0-flash": _info(ModelFamily.GEMINI_2_0_FLASH, 1_048_576),
    "gemini-2.5-flash": _info(ModelFamily.GEMINI_2_5_FLASH, 1_048_576),
    "gemini-2.5-pro": _info(ModelFamily.GEMINI_2_5_PRO, 1_048_576),
}
_PREFIXES = sorted(_BY_PREFIX, key=len, reverse=True)


def resolve_model_info(model: str, given: ModelInfo | None = None) -> ModelInfo:
    """``given`` completed with the table's (or the permissive) values for keys it leaves out."""
    base = PERMISSIVE_MODEL_INFO
    for prefix in _PREFIXES:
        if model == prefix or model.startswith(prefix + "-"):
            base = _BY_PREFIX[prefix]
            break
    if given is None:
        return dict(base)  # type: ignore[return-value]
    merged: ModelInfo = {**base, **given}
    return merged
