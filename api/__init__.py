"""The producers' side of tokenmill: the HTTP API (``create_app``) and the ``tokenmill`` CLI."""

from api.app import create_app
from api.errors import (
    APIError,
    Conflict,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimitExceeded,
    ServiceUnavailable,
    Unauthenticated,
    UpstreamFailed,
)

__all__ = [
    "APIError",
    "Conflict",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "RateLimitExceeded",
    "ServiceUnavailable",
    "Unauthenticated",
    "UpstreamFailed",
    "create_app",
]
