"""The Prometheus metrics of the workers, and the hooks that feed them.

Requests are counted, not Celery tasks (a task is a chunk of up to 512 requests). The figures that
the ledger also holds (requests finished, tokens, cost, cache hits) are counted when the ledger
write that records them has committed, from what that write kept (``RecordOutcome.inserted``: a
duplicate delivery counts nothing): summed over the processes that did the work, they equal the
ledger. The others (durations, waits, lookups, 429s, retries, in flight, leases reclaimed) are rates of
what happened. Names follow the OpenTelemetry GenAI conventions where there is one
(``gen_ai.client.token.usage`` -> ``gen_ai_client_token_usage``, ``gen_ai.client.operation.duration``
-> ``gen_ai_client_operation_duration_seconds``, attributes ``gen_ai_request_model``,
``gen_ai_operation_name``, ``gen_ai_token_type``), ``tokenmill_*`` for the rest; every label value
is bounded (``telemetry.labels``).

Multiprocess: a worker's pool processes write their values to files in the directory that
``tokenmill worker`` gives them (``telemetry.multiprocess``), and its main process serves their sum
(``telemetry.exporter``); without that directory (``tokenmill run``, tests) the values stay in
the process.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from decimal import Decimal

from prometheus_client import Counter, Gauge, Histogram

from store import RequestStatus, ResultRecord
from telemetry.labels import model_labels, tenant_label

__all__ = [
    "CACHED_INPUT_TOKENS",
    "CACHE_LOOKUPS",
    "COST",
    "IN_FLIGHT",
    "LEASES_RECLAIMED",
    "LIMITER_WAIT",
    "OPERATION_DURATION",
    "RATE_LIMITED",
    "REQUESTS_FINISHED",
    "RETRIES",
    "TIME_TO_FIRST_CHUNK",
    "TOKEN_USAGE",
    "RecordedRequest",
    "observe_limiter_wait",
    "observe_reclaimed_lease",
    "observe_recorded",
    "request_ended",
    "request_started",
]

MODEL = "gen_ai_request_model"
TENANT = "tenant"
OPERATION = "gen_ai_operation_name"
CHAT = "chat"  # every call a worker makes is a chat completion

# The OpenTelemetry GenAI semantic conventions' advised buckets.
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS_FINISHED = Counter(
    "tokenmill_requests_finished",
    "Requests whose result the ledger recorded, by outcome: succeeded (a paid upstream answer), "
    "cache_hit (an answer already paid for, billed 0) or failed.",
    [MODEL, TENANT, "outcome"],
)
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Billed tokens per recorded answer (cache hits bill none), by gen_ai_token_type input|output.",
    [OPERATION, MODEL, TENANT, "gen_ai_token_type"],
    buckets=_TOKEN_BUCKETS,
)
CACHED_INPUT_TOKENS = Counter(
    "tokenmill_cached_input_tokens",
    "Input tokens of recorded answers that the provider's prompt cache served (part of the input "
    "tokens, billed at the cached-input price).",
    [MODEL, TENANT],
)
COST = Counter(
    "tokenmill_cost_usd",
    "US dollars billed for recorded answers (the ledger keeps the exact decimals: /v1/usage).",
    [MODEL, TENANT],
)
OPERATION_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Duration of each upstream attempt; error_type is empty on success, else the HTTP status or "
    "the error's class.",
    [OPERATION, MODEL, TENANT, "error_type"],
    buckets=_DURATION_BUCKETS,
)
TIME_TO_FIRST_CHUNK = Histogram(
    "gen_ai_client_operation_time_to_first_chunk_seconds",
    "Time to the first text chunk of a streamed upstream call.",
    [OPERATION, MODEL, TENANT],
    buckets=_DURATION_BUCKETS,
)
CACHE_LOOKUPS = Counter(
    "tokenmill_cache_lookups",
    "Response-cache lookups by result: hit (a stored answer), join (the answer of an identical "
    "call in flight, waited for: single-flight) or miss (this call goes upstream).",
    [MODEL, TENANT, "result"],
)
RATE_LIMITED = Counter(
    "tokenmill_upstream_rate_limited",
    "429 answers received from the provider.",
    [MODEL, TENANT],
)
RETRIES = Counter(
    "tokenmill_upstream_retries",
    "Upstream attempts retried in the worker after a retryable error (429, 5xx, timeout).",
    [MODEL, TENANT],
)
LIMITER_WAIT = Histogram(
    "tokenmill_rate_limiter_wait_seconds",
    "Time an upstream attempt waited for a slot of the global rate limits.",
    [MODEL],
    buckets=_WAIT_BUCKETS,
)
IN_FLIGHT = Gauge(
    "tokenmill_requests_in_flight",
    "Requests the worker processes are running now.",
    [MODEL],
    multiprocess_mode="livesum",
)
LEASES_RECLAIMED = Counter(
    "tokenmill_leases_reclaimed",
    "Requests claimed from a lease that had run out: their worker was killed or froze.",
    [MODEL, TENANT],
)


class RecordedRequest:
    """What the metrics need of a request whose record is being written: its model and tenant."""

    __slots__ = ("model", "tenant_id")

    def __init__(self, model: object, tenant_id: str | None) -> None:
        self.model = model_labels(model)
        self.tenant_id = tenant_label(tenant_id)


def observe_recorded(
    recorded: Iterable[tuple[ResultRecord, RecordedRequest | None]],
    costs: Mapping[str, Decimal],
    replaced: Container[str] = (),
) -> None:
    """Count records the ledger just kept, with the costs it wrote for them (by request id);
    ``replaced``: ids whose record the ledger refused, recorded as failed with their spend."""
    for record, request in recorded:
        model, tenant = _labels(request)
        if record.status is not RequestStatus.SUCCEEDED or record.request_id in replaced:
            outcome = "failed"
        else:
            outcome = "cache_hit" if record.cached else "succeeded"
        REQUESTS_FINISHED.labels(model, tenant, outcome).inc()
        usage = record.usage
        if record.cached or (usage.prompt_tokens <= 0 and usage.completion_tokens <= 0):
            continue
        TOKEN_USAGE.labels(CHAT, model, tenant, "input").observe(usage.prompt_tokens)
        TOKEN_USAGE.labels(CHAT, model, tenant, "output").observe(usage.completion_tokens)
        if usage.cached_prompt_tokens:
            CACHED_INPUT_TOKENS.labels(model, tenant).inc(usage.cached_prompt_tokens)
        cost = costs.get(record.request_id)
        if cost:
            COST.labels(model, tenant).inc(float(cost))


def _labels(request: RecordedRequest | None) -> tuple[str, str]:
    if request is None:
        return model_labels(None), tenant_label(None)
    return request.model, request.tenant_id


def observe_reclaimed_lease(model: object, tenant_id: str | None) -> None:
    LEASES_RECLAIMED.labels(model_labels(model), tenant_label(tenant_id)).inc()


def request_started(model: object) -> None:
    IN_FLIGHT.labels(model_labels(model)).inc()


def request_ended(model: object) -> None:
    IN_FLIGHT.labels(model_labels(model)).dec()


def observe_limiter_wait(model: str, seconds: float) -> None:
    LIMITER_WAIT.labels(model_labels(model)).observe(seconds)
