"""Every Redis key and Celery name the workers use, in one place (arq style).

Coordination keys live under one prefix (``Settings.key_prefix``, default ``tokenmill:``) so that a
deployment, or a test, can own a namespace. The response cache has its own prefix
(``Settings.cache_prefix``) because it may live on another Redis with another eviction policy.

Layout under the prefix::

    limit:{endpoint}:{model}           hash: GCRA state (rpm / tpm) and the AIMD concurrency cap
    limit:{endpoint}:{model}:leases    sorted set: in-flight slots, scored by lease expiry
    dispatch:{dispatch_id}             string: marker of one chunk message in flight (see dispatch.py)
"""

from __future__ import annotations

__all__ = [
    "COMPLETE_CHUNK_TASK",
    "DEFAULT_KEY_PREFIX",
    "DEFAULT_QUEUE",
    "DISPATCH_MARKER_PREFIX",
    "LIMIT_PREFIX",
    "SWEEP_TASK",
    "dispatch_marker_key",
    "limit_key",
    "limit_leases_key",
]

DEFAULT_KEY_PREFIX = "tokenmill:"
LIMIT_PREFIX = "limit:"
DISPATCH_MARKER_PREFIX = "dispatch:"

# Celery names: stable strings, because messages already in the broker refer to them.
COMPLETE_CHUNK_TASK = "tokenmill.complete_chunk"
SWEEP_TASK = "tokenmill.sweep"
DEFAULT_QUEUE = "tokenmill"


def limit_key(prefix: str, endpoint: str, model: str) -> str:
    return f"{prefix}{LIMIT_PREFIX}{endpoint}:{model}"


def limit_leases_key(prefix: str, endpoint: str, model: str) -> str:
    return f"{limit_key(prefix, endpoint, model)}:leases"


def dispatch_marker_key(prefix: str, dispatch_id: str) -> str:
    return f"{prefix}{DISPATCH_MARKER_PREFIX}{dispatch_id}"
