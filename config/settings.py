"""The one settings object of tokenmill, read from ``TOKENMILL_*`` environment variables.

Provider credentials are *not* here: they follow the openai SDK's own conventions
(``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``AZURE_OPENAI_API_KEY``, ``AZURE_OPENAI_ENDPOINT``,
``OPENAI_API_VERSION``, ``GEMINI_API_KEY``) and are read by ``models`` where a client is built.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, Self
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ModelLimits", "Settings", "get_settings", "url_with_password"]


def url_with_password(url: str, password: str) -> str:
    """``url`` with its user's password set to ``password``, percent-escaped.

    A password pasted into a URL as it is breaks the URL on ``@``, ``/``, ``:``, ``#``, ``?`` or
    ``%``; escaped, SQLAlchemy's URL parser gives the driver the password back unchanged.
    """
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    if not at or not user or not hostport:
        raise ValueError(
            "TOKENMILL_DATABASE_PASSWORD is set but TOKENMILL_DATABASE_URL names no user and host "
            "to give it to (expected e.g. postgresql+psycopg://USER@HOST:5432/DB)"
        )
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{hostport}"))


class ModelLimits(BaseModel):
    """Global limits for one model, shared by every worker on every machine."""

    rpm: int | None = Field(default=None, ge=1, description="requests per minute")
    tpm: int | None = Field(default=None, ge=1, description="tokens per minute (prompt + completion)")
    max_in_flight: int | None = Field(default=None, ge=1, description="concurrent upstream calls")
    # A request's max_tokens is reserved from tpm when it is admitted; clamped to this (else to
    # the model's context window) so that a huge max_tokens cannot book the limit years ahead.
    max_output_tokens: int | None = Field(
        default=None, ge=1, description="largest completion the model gives; caps a reservation"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENMILL_", extra="ignore")

    # Storage. The defaults are the embedded mode: a SQLite file and a disk cache in the
    # working directory, no server needed.
    database_url: str = "sqlite:///./tokenmill.db"
    database_password: SecretStr | None = Field(
        default=None,
        description=(
            "the password of database_url's user, given apart so that any character works: it is "
            "percent-escaped into database_url (replacing a password written there)"
        ),
    )
    broker_url: str | None = Field(
        default=None, description="Redis URL of the Celery broker; unset = embedded"
    )
    cache_url: str = Field(default="./.tokenmill/cache", description="redis://... or a directory")
    cache_prefix: str = "tokenmill:cache:"
    cache_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    cache_scope: Literal["tenant", "global"] = Field(
        default="tenant",
        description=(
            "tenant: each tenant's cached answers and single-flight are its own (a hit cannot tell "
            "one tenant what another asked); global: tenants share them, paying once for prompts "
            "they have in common, at the price of each seeing (and timing) the others' answers"
        ),
    )
    max_models_per_worker: int = Field(
        default=64,
        gt=0,
        description=(
            "upstream clients a worker process keeps, least recently used dropped first: model names "
            "are whatever tenants send, so without a bound one tenant could grow every worker's set"
        ),
    )
    cache_lock_ttl_seconds: float = Field(
        default=5.0,
        gt=0,
        description=(
            "how long a single-flight lock outlives its holder's last heartbeat (every third of it): "
            "the wait a killed worker costs the requests identical to its own; raise it only if "
            "event loops stall that long"
        ),
    )
    cache_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="a Redis cache reply later than this is a slow cache, waited for; a refused one is down",
    )

    # Model defaults.
    default_model: str = "gpt-4o-mini"
    limits: dict[str, ModelLimits] = Field(default_factory=dict)

    # Work shape.
    chunk_size: int = Field(
        default=512,
        ge=1,
        le=10_000,
        description="most request ids per Celery message (see dispatch.chunk_length)",
    )
    in_flight_per_process: int = Field(default=64, ge=1, le=10_000)
    # Single calls (POST /v1/chat/completions) each worker process runs at once on its interactive
    # lane, apart from its chunks' window (workers.lane); 0 turns the lane off.
    lane_in_flight_per_process: int = Field(default=64, ge=0, le=10_000)
    lane_busy_batch_share: float = Field(
        default=0.125,
        gt=0,
        le=1,
        description=(
            "the share of its window a chunk keeps running (nothing claimed ahead) while single calls "
            "are being sent (one in the last 2 s, workers.lane_pressure), so that batch work leaves "
            "the cores, PostgreSQL and Redis to them; 1 turns the give-way off (batch throughput "
            "kept whatever single calls wait)"
        ),
    )
    chunk_refill_seconds: float = Field(
        default=30.0,
        ge=0,
        description=(
            "how long a chunk keeps filling its window's free slots with queued requests of every "
            "tenant, shared by weight (workers.fair_share), so the process's window stays full "
            "instead of draining at every chunk's end; past it, free slots are still filled while a "
            "request started before it runs (no slot idles behind a slow call); bounded, so that "
            "the process takes its next message (an agent message, say) now and then"
        ),
    )
    max_attempts: int = Field(default=6, ge=1, le=100)
    # A worker slot waits at most this long in process (for a rate-limit slot, or between retries
    # of 429s); past it the request goes back in line with a not_before, freeing the slot.
    hand_back_after_seconds: float = Field(default=30.0, gt=0)
    # How long a request keeps retrying 429s (from its first hand-back for one) before it fails:
    # a storm passes, an account throttled for hours is an outage to look at. Within the batch's
    # completion window, which ends it anyway.
    rate_limit_retry_seconds: float = Field(default=6 * 3600.0, gt=0)
    # The same budget for a single call (POST /v1/chat/completions), whose caller is waiting: past
    # it the provider's 429 is its answer (a 429 to the caller, as the provider's own would be),
    # rather than a wait until the API's sync_timeout_seconds.
    interactive_rate_limit_retry_seconds: float = Field(default=60.0, gt=0)
    lease_seconds: int = Field(
        default=20,
        ge=2,
        description=(
            "how long a claimed request stays its worker's without a heartbeat (4 per lease, from "
            "a thread of their own): a killed worker's requests run again within about this plus "
            "sweep_interval_seconds"
        ),
    )
    visibility_timeout_seconds: int = Field(default=3600, ge=10)
    unacked_restore_interval_seconds: float = Field(default=5.0, gt=0)
    worker_shutdown_seconds: float = Field(
        default=30.0,
        ge=15,
        description=(
            "the longest a worker takes to exit after SIGTERM/SIGINT whatever its broker does (soft "
            "shutdown is 10 s, then a cold one); past it the worker kills its pool and exits"
        ),
    )
    sweep_interval_seconds: float = Field(
        default=5.0, gt=0, description="how often beat looks for expired leases and lost messages"
    )
    # Workers' coordination keys (rate limits, dispatch markers) live in the broker's Redis under
    # key_prefix; broker_key_prefix is kombu's global_keyprefix for the broker's own keys. Both let
    # several deployments (or tests) share one Redis.
    key_prefix: str = "tokenmill:"
    broker_key_prefix: str = ""
    upstream_timeout_seconds: float = Field(default=600.0, gt=0, description="one upstream call")
    # Which registered provider (models.providers) serves model calls; its credentials stay in its
    # own environment variables (see the module docstring).
    provider: str = Field(
        default="openai", description="openai (also Gemini and OpenAI-compatible servers) or azure"
    )
    # A queued request with no live dispatch marker is re-sent once its dispatch is this old.
    sweep_grace_seconds: float = Field(default=30.0, ge=0)

    # Webhooks. Receivers on loopback/private/link-local addresses are refused unless allowed here
    # (a deployment whose receivers are on its own network); each delivery's whole exchange has
    # a wall-clock deadline, so a receiver trickling bytes cannot hold the delivery loop.
    webhook_allow_private: bool = False
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, le=300)

    # API.
    max_upload_bytes: int = Field(default=200 * 1024 * 1024, ge=1)
    max_request_body_bytes: int = Field(default=1024 * 1024, ge=1)
    max_requests_per_batch: int = Field(default=1_000_000, ge=1)
    # An input file larger than this is validated after POST /v1/batches answered (status
    # "validating"): a 100k-line file held the request 45 s. 0: every file.
    background_ingest_bytes: int = Field(default=1024 * 1024, ge=0)
    # Validations running at once in one API process (each holds up to ~64 MB); more wait.
    max_background_ingests: int = Field(default=2, ge=1)
    # A validating batch's lease, renewed by the API process that reads its file (every third of
    # it): the sweeper fails a batch whose lease ran out (that API died), instead of leaving it
    # "validating" until its completion window ends.
    validation_lease_seconds: int = Field(default=60, ge=3)
    # Batches one tenant may have validating in the background at once (a 429 beyond). They are
    # read a few at a time, tenants in turn (api.validation_slots); each waiting one is a lease the
    # API renews, and a batch failed if that API process dies.
    max_validating_batches_per_tenant: int = Field(default=16, ge=1)
    # Uploads one tenant may have in flight at once in one API process (a 429 beyond, before the
    # body is read): each spools its body to a temporary file (up to max_upload_bytes, twice with
    # an Idempotency-Key) and holds a connection while it arrives.
    max_uploads_in_flight_per_tenant: int = Field(default=4, ge=1)
    sync_timeout_seconds: float = Field(default=600.0, gt=0, description="POST /v1/chat/completions wait")
    # The longest the API's statements wait for a lock (PostgreSQL's lock_timeout; 0: no bound).
    # An operator's LOCK TABLE, VACUUM FULL or CREATE INDEX held each request that needed the
    # table, and with the API's threads all taken every route of every tenant; past this it
    # answers 503 database_unavailable. Far above what the API's writes wait for one another.
    api_lock_timeout_seconds: float = Field(default=10.0, ge=0)
    # How long a POST's answer is kept for a retry with the same Idempotency-Key.
    idempotency_retention_seconds: int = Field(default=24 * 3600, ge=60)
    files_dir: Path = Field(default=Path("./.tokenmill/files"))
    # The bytes one tenant's uploaded files may hold, for a tenant with no cap of its own
    # (``tokenmill tenants set NAME --max-stored-bytes N``): without one, a tenant could fill the
    # files disk and every tenant's uploads failed. 100 GiB, OpenAI's former limit per
    # organization; "none" for no cap.
    default_max_stored_bytes: int | None = Field(
        default=100 * 1024**3,
        ge=0,
        description="bytes a tenant's uploaded files may hold unless its own cap is set; none: no cap",
    )

    # Observability. /metrics names tenants and their spend: only the operator's token opens it
    # (on the API it does not exist without one). A worker serves its /metrics only when given a
    # port, on 127.0.0.1 unless the operator opens it (0.0.0.0 in a container network).
    metrics_token: SecretStr | None = None
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    worker_metrics_host: str = "127.0.0.1"
    metrics_ledger_cache_seconds: float = Field(
        default=5.0, ge=0, description="how long the API reuses its ledger query's answer across scrapes"
    )
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="auto: readable text on a terminal, one JSON object per line otherwise"
    )
    tracing: bool = Field(
        default=False,
        description=(
            "OpenTelemetry spans (API, worker, model call, ledger write), exported over OTLP/HTTP as "
            "the OTEL_* variables say; needs the tracing extra. Off: opentelemetry is never imported"
        ),
    )

    # Flower: no default password; ``tokenmill flower`` refuses to start without one.
    flower_basic_auth: SecretStr | None = None
    flower_url: str | None = Field(
        default=None, description="where operators open Flower (linked from the dashboard); unset: no link"
    )

    # The dashboard (/ui). Operators are tenants (ids, as `tokenmill keys create NAME` makes them)
    # whose keys see every tenant's batches, the queue and the workers; any other key sees its own.
    dashboard_operator_tenants: list[str] = Field(default_factory=list)
    dashboard_session_seconds: int = Field(
        default=8 * 3600, ge=60, le=30 * 24 * 3600, description="how long a dashboard login lasts"
    )

    # Agents: modules whose tools are registered on import.
    tool_modules: list[str] = Field(default_factory=list)
    # Modules registering agent types (``agents.agent_type``) for the distributed runtime; workers
    # and producers both import them. JSON list: TOKENMILL_AGENT_MODULES='["myapp.agents"]'.
    agent_modules: list[str] = Field(default_factory=list)
    agent_reply_timeout_seconds: float = Field(default=600.0, gt=0, description="send_message wait")

    @field_validator("broker_url")
    @classmethod
    def _empty_broker_is_embedded(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("default_max_stored_bytes", mode="before")
    @classmethod
    def _none_is_no_cap(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("", "none"):
            return None
        return value

    @model_validator(mode="after")
    def _password_into_url(self) -> Self:
        if self.database_password is not None:
            self.database_url = url_with_password(
                self.database_url, self.database_password.get_secret_value()
            )
        return self

    @property
    def cache_is_redis(self) -> bool:
        return self.cache_url.startswith(("redis://", "rediss://", "unix://"))

    @property
    def embedded(self) -> bool:
        return self.broker_url is None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
