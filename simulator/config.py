"""The simulator's settings: set at start (flags, ``--config``), changed at runtime (POST /_sim/config)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from simulator.errors import ConfigError

__all__ = ["CONFIG_ENV", "PARENT_ENV", "SimConfig"]

# The whole config as JSON, for the server processes (set by SimulatorServer and by serve() for its workers).
CONFIG_ENV = "SIMULATOR_CONFIG_JSON"
# Set by SimulatorServer: the pid of the process that owns the server; if it dies, the server stops.
PARENT_ENV = "SIMULATOR_PARENT_PID"


class SimConfig(BaseModel):
    """Latency, fault rates and behaviour switches. Fractions are per request, from a ``seed``-ed stream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    latency_ms: float = Field(0.0, ge=0, description="Delay before every reply (time to first byte).")
    latency_jitter_ms: float = Field(0.0, ge=0, description="Extra uniform random delay in [0, jitter].")
    latency_per_token_ms: float = Field(0.0, ge=0, description="Extra delay per completion token.")
    rate_429: float = Field(0.0, ge=0, le=1, description="Fraction of completions answered 429.")
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with a 429.")
    rate_500: float = Field(0.0, ge=0, le=1, description="Fraction of completions answered 500.")
    rate_timeout: float = Field(
        0.0, ge=0, le=1, description="Fraction that hang timeout_s then drop the connection."
    )
    timeout_s: float = Field(30.0, ge=0, description="How long a simulated timeout hangs.")
    seed: int = Field(0, description="Seed of the fault and latency draws.")
    empty_chunks: bool = Field(
        False, description="Interleave empty chunks (choices [] / delta {}) in streams."
    )
    stream_chunk_chars: int = Field(
        16, ge=1, description="Characters of content (or arguments) per stream chunk."
    )
    stream_chunk_delay_ms: float = Field(0.0, ge=0, description="Delay between stream chunks.")
    break_stream_after: int | None = Field(
        None, ge=0, description="Drop every stream after this many chunks."
    )
    known_models: list[str] | None = Field(None, description="null: any model; else others get 404.")
    require_api_key: str | None = Field(None, description="null: any key; else other keys get 401.")
    rpm_limit: int | None = Field(None, ge=1, description="Requests per rolling 60 s; beyond it 429.")
    max_context_tokens: int | None = Field(
        None, ge=1, description="Prompts above it get context_length_exceeded."
    )
    reply_words: int | None = Field(None, ge=1, description="Words per generated reply (null: 8-40 by hash).")
    answered_model_suffix: str = Field(
        "",
        max_length=64,
        description="Added to the model an answer names, as OpenAI answers gpt-4o-mini as a snapshot.",
    )

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> SimConfig:
        try:
            return cls.model_validate(dict(values))
        except ValidationError as e:
            raise ConfigError(f"invalid simulator config: {e}") from e

    def updated(self, changes: Mapping[str, Any]) -> SimConfig:
        """A copy with ``changes`` applied, validated as a whole."""
        return SimConfig.parse({**self.model_dump(), **changes})

    def public(self) -> dict[str, Any]:
        """The settings as JSON, with the required API key masked (keys never leave the process)."""
        values = self.model_dump()
        if values["require_api_key"] is not None:
            values["require_api_key"] = "***"
        return values
