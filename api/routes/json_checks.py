"""The checks every JSON body of a producer gets (``store.parse_json``: no NaN or Infinity, nesting
of at most 64 levels, no NUL, no lone surrogate), for the routes whose body FastAPI reads into a
model (``POST /v1/batches``): Python's ``json``, which FastAPI reads with, takes NaN and Infinity,
and a model then refused them as "not a valid string" (or took them, in a field of any JSON). The
routes that read their body themselves (chat completions, agent runs) call ``store.parse_json``
through ``api.routes.single_request.json_object_body``, after their key is looked up."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.params import Form
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

import store
from api.deps import current_tenant, remember_tenant
from api.errors import InvalidRequest

__all__ = ["CheckedJSONRoute", "body_refused", "reads_a_json_model"]


def body_refused(error: store.JSONRejected) -> InvalidRequest:
    """The 400 for a body ``store.parse_json`` refused, naming what and where."""
    return InvalidRequest(f"the request body is refused: {error.message}", param=error.param, code=error.code)


def _read_as_json(content_type: str | None) -> bool:
    """Whether FastAPI reads a body of this content type as JSON (none given, or a json type)."""
    if not content_type:
        return True
    media_type = content_type.split(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def reads_a_json_model(route: APIRoute) -> bool:
    """Whether FastAPI reads ``route``'s body as JSON into a model (not a form)."""
    return route.body_field is not None and not isinstance(route.body_field.field_info, Form)


class CheckedJSONRoute(APIRoute):
    """A route whose JSON body is checked by ``store.parse_json`` before FastAPI reads it into
    its model: a refused body is a 400 naming the value (``non_finite_number``, ``param``
    ``metadata.tag``), never a model's "Input should be a valid string" about a NaN.

    The key is looked up first, before a byte of the body is read (the route's ``TenantDep``
    takes the tenant found): a caller with no valid key hears its 401 at once, where reading the
    body first made the API read and parse up to a whole body's limit (1 MiB) for it, or wait on a
    body that never ended. The body is small (a request's settings, not its lines): parsing it
    twice costs nothing that counts."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if not reads_a_json_model(self):
            return handler

        async def checked(request: Request) -> Response:
            authorization = request.headers.get("authorization")
            tenant = await run_in_threadpool(current_tenant, request.app.state.engine, authorization)
            remember_tenant(request, tenant)
            raw = await request.body()  # kept by the request: FastAPI reads it again
            if raw and _read_as_json(request.headers.get("content-type")):
                try:
                    store.parse_json(raw)
                except store.JSONRejected as e:
                    raise body_refused(e) from e
            return await handler(request)

        return checked
