"""Who is looking at the dashboard: the session cookie, the operator rule, and the checks that keep
another site from acting through a logged-in browser (CSRF).

- The cookie holds a random token (``store.dashboard_sessions`` keeps its hash), never the API
  key; ``__Host-`` prefixed, ``Secure``, ``HttpOnly``, ``SameSite=Strict``, path ``/``. Browsers
  keep ``Secure`` cookies only over HTTPS (or on localhost): serve the dashboard behind TLS.
- Every POST (login, logout) must come from a page of this origin: its ``Origin`` header (or,
  when a browser sends none, its ``Referer``) must name this host. Logout also carries the
  session's CSRF token in its form. A login form posted from another site is refused, so no site
  can log a browser in under its own key either.
- Operators are the tenants listed in ``TOKENMILL_DASHBOARD_OPERATOR_TENANTS``: their sessions
  see every tenant's batches, the queue per tenant and the workers. Everyone else sees their own.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.responses import Response

from config import Settings
from store.dashboard_sessions import DashboardLogin, dashboard_session

__all__ = [
    "SESSION_COOKIE",
    "Viewer",
    "clear_session_cookie",
    "same_origin",
    "set_session_cookie",
    "viewer_of",
]

SESSION_COOKIE = "__Host-tokenmill-session"
# A token is 43 URL-safe characters; anything much longer is not one of ours (and is not hashed).
_MAX_TOKEN_CHARS = 128


@dataclass(frozen=True, slots=True)
class Viewer:
    """A logged-in browser: whose session, and whether it may see every tenant."""

    login: DashboardLogin
    operator: bool

    @property
    def tenant_scope(self) -> str | None:
        """The tenant whose data the pages show; None for an operator: every tenant's."""
        return None if self.operator else self.login.tenant_id

    def csrf_matches(self, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.login.csrf_token.encode())


def session_token(request: Request) -> str | None:
    token = request.cookies.get(SESSION_COOKIE)
    if not token or len(token) > _MAX_TOKEN_CHARS:
        return None
    return token


def viewer_of(request: Request) -> Viewer | None:
    """The viewer whose live session cookie came with ``request``, or None."""
    token = session_token(request)
    if token is None:
        return None
    login = dashboard_session(request.app.state.engine, token)
    if login is None:
        return None
    settings: Settings = request.app.state.settings
    return Viewer(login, operator=login.tenant_id in settings.dashboard_operator_tenants)


def set_session_cookie(response: Response, token: str, max_age: int) -> None:
    response.set_cookie(
        SESSION_COOKIE, token, max_age=max_age, path="/", secure=True, httponly=True, samesite="strict"
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(SESSION_COOKIE, path="/", secure=True, httponly=True, samesite="strict")


def same_origin(request: Request) -> bool:
    """Whether a POST comes from a page of this host: its Origin (else its Referer) names it.
    Hosts are compared, not schemes: behind a TLS proxy the app sees http, the browser https."""
    host = request.headers.get("host")
    source = request.headers.get("origin") or request.headers.get("referer")
    if not host or not source or source == "null":
        return False
    return urlsplit(source).netloc.lower() == host.lower()
