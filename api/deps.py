"""Request dependencies, as ``Annotated`` aliases the routes declare by type."""

from __future__ import annotations

from typing import Annotated, NoReturn

from fastapi import Depends, Header, Path, Query, Request
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import Scope

import store
from api.errors import Unauthenticated
from config import Settings

__all__ = [
    "ID_PATTERN",
    "SMALL_BODY_BYTES",
    "AfterCursor",
    "EngineDep",
    "ObjectId",
    "SettingsDep",
    "TenantDep",
    "bearer_key",
    "current_tenant",
    "declares_a_small_body",
    "get_engine",
    "get_settings",
    "raise_unknown_key",
    "remember_tenant",
    "request_tenant",
    "scope_tenant",
    "tenant_of_key",
]

# Our ids (file-…, batch_…) and OpenAI's are short ASCII; anything else is refused before it
# reaches SQL (PostgreSQL rejects a NUL byte in text, for one).
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
ObjectId = Annotated[str, Path(pattern=ID_PATTERN, description="an object id")]
AfterCursor = Annotated[
    str | None, Query(pattern=ID_PATTERN, description="id of the last object of the previous page")
]


# Async, though they only read the app's state: FastAPI runs a plain function dependency on the
# threadpool, a thread hop (a wake-up and a GIL hand-over) per dependency per request.
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]


def bearer_key(authorization: str | None) -> str:
    """The key in ``Authorization: Bearer <key>``; 401 when there is none (no look-up)."""
    if not authorization:
        raise Unauthenticated(
            "You didn't provide an API key: send it as 'Authorization: Bearer <key>' "
            "(create one with `tokenmill keys create NAME`).",
            code="missing_api_key",
        )
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise Unauthenticated("The Authorization header must be 'Bearer <key>'.")
    return key


def tenant_of_key(engine: Engine, key: str) -> store.Tenant:
    """The tenant owning ``key`` (a ledger look-up: call it off the event loop); 401 otherwise."""
    tenant = store.authenticate_api_key(engine, key)
    if tenant is None:
        raise_unknown_key()
    return tenant


def raise_unknown_key() -> NoReturn:
    """The 401 of a key the ledger does not know (or revoked)."""
    # Never echo the key back: a log or a proxy may keep the response.
    raise Unauthenticated("Incorrect API key provided, or the key was revoked.")


def current_tenant(engine: EngineDep, authorization: Annotated[str | None, Header()] = None) -> store.Tenant:
    """The tenant whose key is in ``Authorization: Bearer <key>``; 401 otherwise."""
    return tenant_of_key(engine, bearer_key(authorization))


def remember_tenant(request: Request, tenant: store.Tenant) -> None:
    """Keep the tenant a route found before reading its body, for ``request_tenant``."""
    request.state.tokenmill_tenant = tenant


async def scope_tenant(scope: Scope) -> store.Tenant:
    """For a middleware: the tenant of the request's key, looked up once per request (remembered
    as ``remember_tenant`` does, for the route's ``TenantDep``); ``Unauthenticated`` without a
    valid key."""
    state = scope.setdefault("state", {})  # what ``request.state`` reads and writes
    tenant: store.Tenant | None = state.get("tokenmill_tenant")
    if tenant is None:
        engine = scope["app"].state.engine
        tenant = await run_in_threadpool(current_tenant, engine, Headers(scope=scope).get("authorization"))
        state["tokenmill_tenant"] = tenant
    return tenant


async def request_tenant(
    request: Request, engine: EngineDep, authorization: Annotated[str | None, Header()] = None
) -> store.Tenant:
    """``current_tenant``, or the tenant already found for this request (``remember_tenant``)."""
    tenant: store.Tenant | None = getattr(request.state, "tokenmill_tenant", None)
    if tenant is None:
        tenant = await run_in_threadpool(current_tenant, engine, authorization)
    return tenant


TenantDep = Annotated[store.Tenant, Depends(request_tenant)]

# A body declared at most this large is read (and parsed) before its key is looked up where that
# saves a statement (a chat completion's key is looked up with its submit); any larger one, or one
# of no declared length, only after: a caller with no valid key costs the API no more than this.
SMALL_BODY_BYTES = 64 * 1024


def declares_a_small_body(request: Request) -> bool:
    """Whether the request's Content-Length is at most ``SMALL_BODY_BYTES`` (the server reads no
    more than it declares)."""
    declared = request.headers.get("content-length")
    return declared is not None and declared.isdigit() and int(declared) <= SMALL_BODY_BYTES
