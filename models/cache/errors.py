"""Errors of the response cache's stores and keys.

Exception hierarchy::

    CacheError                      base; never escapes ``ChatCompletionCache``, which turns it
    │                               into a ``CacheStoreError`` event and a miss
    ├── CacheBackendError           the store could not be reached or refused an operation
    │                               (Redis down, timeout, a disk error); ``store``, ``operation``,
    │                               ``timed_out`` (slow, perhaps alive: worth waiting for)
    ├── CacheEntryError             an entry is unreadable: not JSON, wrong shape, or another
    │                               format version
    └── UncacheableRequestError     an argument has no canonical form, so no key can be made

These are deliberately not ``models.errors.ModelClientError``s: a cache failure says nothing about
the provider and must never be retried or reported as one.
"""

from __future__ import annotations

__all__ = ["CacheBackendError", "CacheEntryError", "CacheError", "UncacheableRequestError"]


class CacheError(Exception):
    """Base of every cache error."""


class CacheBackendError(CacheError):
    """A store operation failed for a reason outside the entry itself.

    ``timed_out``: the store did not answer in time, which a loaded but live store does; single-flight
    keeps waiting on such a store rather than going around it (and paying for a duplicate call). A
    store that refused the connection is down, and a request goes upstream without it.
    """

    def __init__(self, message: str, *, store: str, operation: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.store = store
        self.operation = operation
        self.timed_out = timed_out


class CacheEntryError(CacheError):
    """A stored entry cannot be decoded (corrupt, or written by another format version)."""


class UncacheableRequestError(CacheError):
    """A request argument has no canonical JSON form, so it cannot be keyed."""
