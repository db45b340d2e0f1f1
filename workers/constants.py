"""Every Redis key and Celery name the workers use, in one place (arq style).

Coordination keys live under one prefix (``Settings.key_prefix``, default ``tokenmill:``) so that a
deployment, or a test, can own a namespace. The response cache has its own prefix
(``Settings.cache_prefix``) because it may live on another Redis with another eviction policy.

Layout under the prefix::

    limit:state:{endpoint}:{model}     hash: GCRA state (rpm / tpm) and the AIMD concurrency cap
    limit:leases:{endpoint}:{model}    sorted set: in-flight slots, scored by lease expiry
    dispatch:{dispatch_id}             string: marker of one chunk message in flight (see dispatch.py)
    dispatch-seq:sent                  counter: sequence number of the last chunk message published
    dispatch-seq:taken                 the highest sequence number a worker has taken from the queue
    sweep:lock                         the lock sweepers take turns with (sweeper.py)
    agent_reply:{message_id}           list: the reply to one distributed agent message (agent_runtime.py)
    agent_lock:{tenant}:{type}/{key}   lock: one handler per agent at a time (agent_host.py)
    lane:queue:{tenant_id}             list: one tenant's single calls waiting for a worker's lane
    lane:tenants                       hash: tenants that sent single calls lately -> weight|sent at
    lane:arrivals                      list: tenants newly in lane:tenants (wakes the lanes)
    lane:wake:{owner}                  list: wakes one lane consumer's blocked take (a slot freed)
    lane:busy                          string: lives a while after each single call is sent; chunks
                                       start fewer requests while it does (lane_pressure.py)
    lane:reply:{request_id}            list: the outcome of one single call, for the API that waits
    lane:stream:{request_id}           stream: one streamed single call's chunks, then its outcome
"""

from __future__ import annotations

__all__ = [
    "AGENT_MESSAGE_TASK",
    "COMPLETE_CHUNK_TASK",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_QUEUE",
    "DISPATCH_MARKER_PREFIX",
    "LIMIT_PREFIX",
    "SWEEP_TASK",
    "agent_lock_key",
    "agent_reply_key",
    "dispatch_marker_key",
    "dispatch_sequence_keys",
    "lane_arrivals_key",
    "lane_busy_key",
    "lane_queue_key",
    "lane_reply_key",
    "lane_stream_key",
    "lane_tenants_key",
    "lane_wake_key",
    "limit_key",
    "limit_leases_key",
    "sweep_lock_key",
]

DEFAULT_KEY_PREFIX = "tokenmill:"
LIMIT_PREFIX = "limit:"
DISPATCH_MARKER_PREFIX = "dispatch:"

# Celery names: stable strings, because messages already in the broker refer to them.
COMPLETE_CHUNK_TASK = "tokenmill.complete_chunk"
AGENT_MESSAGE_TASK = "tokenmill.agent_message"
SWEEP_TASK = "tokenmill.sweep"
DEFAULT_QUEUE = "tokenmill"


# A model name is the tenant's to choose (any characters, ':' included): each key says what it
# holds before the name, which comes last, so that no name makes one model's key another's
# ("m:leases" once named m's leases as its state).


def limit_key(prefix: str, endpoint: str, model: str) -> str:
    return f"{prefix}{LIMIT_PREFIX}state:{endpoint}:{model}"


def limit_leases_key(prefix: str, endpoint: str, model: str) -> str:
    return f"{prefix}{LIMIT_PREFIX}leases:{endpoint}:{model}"


def dispatch_marker_key(prefix: str, dispatch_id: str) -> str:
    return f"{prefix}{DISPATCH_MARKER_PREFIX}{dispatch_id}"


def dispatch_sequence_keys(prefix: str) -> tuple[str, str]:
    """(last sequence number published, highest sequence number taken by a worker)."""
    return f"{prefix}dispatch-seq:sent", f"{prefix}dispatch-seq:taken"


def agent_reply_key(prefix: str, message_id: str) -> str:
    return f"{prefix}agent_reply:{message_id}"


def agent_lock_key(prefix: str, tenant_id: str | None, agent_id: object) -> str:
    return f"{prefix}agent_lock:{tenant_id or ''}:{agent_id}"


def sweep_lock_key(prefix: str) -> str:
    return f"{prefix}sweep:lock"


def lane_queue_key(prefix: str, tenant_id: str) -> str:
    return f"{prefix}lane:queue:{tenant_id}"


def lane_tenants_key(prefix: str) -> str:
    return f"{prefix}lane:tenants"


def lane_arrivals_key(prefix: str) -> str:
    return f"{prefix}lane:arrivals"


def lane_busy_key(prefix: str) -> str:
    return f"{prefix}lane:busy"


def lane_wake_key(prefix: str, owner: str) -> str:
    return f"{prefix}lane:wake:{owner}"


def lane_reply_key(prefix: str, request_id: str) -> str:
    return f"{prefix}lane:reply:{request_id}"


def lane_stream_key(prefix: str, request_id: str) -> str:
    return f"{prefix}lane:stream:{request_id}"
