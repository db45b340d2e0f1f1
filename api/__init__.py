"""The producers' side of tokenmill over HTTP: the OpenAI-compatible API (``create_app``); the
``tokenmill`` commands live in ``cli``."""

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
