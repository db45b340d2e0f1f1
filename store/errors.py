"""Exceptions of the ledger.

StoreError
 ├── SchemaBehind          the database is not at the revision this code expects
 ├── NotFound
 │    ├── BatchNotFound
 │    └── ConversationNotFound
 ├── InvalidState          the operation does not apply to the row's current status
 │    └── AgentStateConflict   an agent's state was saved by someone else since it was loaded
 ├── QuotaExceeded         new work would take a tenant over a quota its operator set; ``code`` names it
 └── InvalidArgument       a batch-level parameter is wrong (also a ValueError); ``param`` names it
"""

from __future__ import annotations

__all__ = [
    "AgentStateConflict",
    "BatchNotFound",
    "ConversationNotFound",
    "InvalidArgument",
    "InvalidState",
    "NotFound",
    "QuotaExceeded",
    "SchemaBehind",
    "StoreError",
]


class StoreError(Exception):
    """Base of every ledger error."""


class SchemaBehind(StoreError):
    """The database schema is not at the head revision; ``tokenmill db upgrade`` fixes it."""

    def __init__(self, current: str | None, expected: str) -> None:
        self.current = current
        self.expected = expected
        super().__init__(
            f"database is at revision {current or 'base (empty)'}, code expects {expected}: "
            "run `tokenmill db upgrade`"
        )


class NotFound(StoreError):
    pass


class BatchNotFound(NotFound):
    pass


class ConversationNotFound(NotFound):
    pass


class InvalidState(StoreError):
    pass


class AgentStateConflict(InvalidState):
    pass


class InvalidArgument(StoreError, ValueError):
    def __init__(self, message: str, param: str | None = None, *, code: str | None = None) -> None:
        self.param = param
        self.code = code
        super().__init__(message)


class QuotaExceeded(StoreError):
    """``code``: ``queued_requests_quota_exceeded``, ``queued_tokens_quota_exceeded`` or
    ``daily_budget_exceeded`` (``store.quotas``)."""

    def __init__(self, message: str, *, code: str) -> None:
        self.code = code
        super().__init__(message)
