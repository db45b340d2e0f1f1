"""The dashboard's routes: login and logout, the overview (charts, cache hit rate, queue depth,
workers), the batch list and a batch's page, and the small JSON the progress bars poll.

A tenant sees its own batches only; another tenant's batch id is an unknown id here as on the
API ("tenants apart"). An operator (``sessions``) sees every tenant's.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Annotated, Any

import jinja2
from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from api.dashboard.charts import format_value, line_chart
from api.dashboard.sessions import (
    Viewer,
    clear_session_cookie,
    same_origin,
    session_token,
    set_session_cookie,
    viewer_of,
)
from api.deps import ID_PATTERN, EngineDep, ObjectId, SettingsDep
from store import ENDED_STATUSES
from store import dashboard as ledger
from store.clock import now_seconds
from store.dashboard_sessions import close_dashboard_session, open_dashboard_session

__all__ = ["CONTENT_SECURITY_POLICY", "router"]

router = APIRouter(prefix="/ui", include_in_schema=False)

# Scripts, styles and fetches from this origin only; no inline script or style, no frames, no
# plugins; forms post here only. Charts are inline SVG, which is markup, not script.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make browsers send "Origin: null" on our own forms
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8"}
PAGE_SIZE = 25
MAX_POLLED = 100


@dataclass(frozen=True, slots=True)
class Window:
    """A chart window: how far back, in buckets of how long."""

    name: str
    bucket_seconds: int
    buckets: int


WINDOWS = {w.name: w for w in (Window("1h", 60, 60), Window("6h", 600, 36), Window("24h", 1800, 48))}

_templates = jinja2.Environment(
    loader=jinja2.PackageLoader("api.dashboard", "templates"),
    autoescape=True,  # every value escaped, in text and in attributes, unless marked safe (never)
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def _utc(seconds: int | None) -> str:
    if seconds is None:
        return ""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_templates.filters["utc"] = _utc
_templates.filters["figure"] = format_value


def _secured(response: Response) -> Response:
    response.headers.update(_HEADERS)
    return response


def _page(
    name: str, viewer: Viewer | None, settings: Any, status_code: int = 200, **context: Any
) -> HTMLResponse:
    html = _templates.get_template(name).render(
        viewer=viewer,
        flower_url=settings.flower_url if viewer is not None and viewer.operator else None,
        **context,
    )
    response = HTMLResponse(html, status_code=status_code)
    _secured(response)
    return response


def _to_login() -> Response:
    return _secured(RedirectResponse("/ui/login", status_code=303))


def _progress(summary: ledger.BatchSummary) -> dict[str, Any]:
    return {
        "id": summary.id,
        "status": summary.status.value,
        "total": summary.total,
        "completed": summary.completed,
        "failed": summary.failed,
        "cancelled": summary.cancelled,
        "finished": summary.finished,
        "ended": summary.status in ENDED_STATUSES,
    }


@router.get("/login")
def login_form(request: Request, settings: SettingsDep) -> Response:
    if viewer_of(request) is not None:
        return _secured(RedirectResponse("/ui", status_code=303))
    return _page("login.html", None, settings, error=None)


@router.post("/login")
def login(
    request: Request, engine: EngineDep, settings: SettingsDep, api_key: Annotated[str, Form()] = ""
) -> Response:
    if not same_origin(request):
        return _page(
            "login.html", None, settings, 403, error="This form must be sent from this dashboard's own page."
        )
    opened = (
        open_dashboard_session(engine, api_key.strip(), settings.dashboard_session_seconds)
        if api_key
        else None
    )
    if opened is None:
        # Never echo the key back.
        return _page("login.html", None, settings, 401, error="That API key is unknown or was revoked.")
    response = RedirectResponse("/ui", status_code=303)
    set_session_cookie(response, opened.token, settings.dashboard_session_seconds)
    return _secured(response)


@router.post("/logout")
def logout(
    request: Request, engine: EngineDep, settings: SettingsDep, csrf_token: Annotated[str, Form()] = ""
) -> Response:
    viewer = viewer_of(request)
    if viewer is None:
        return _to_login()
    if not same_origin(request) or not viewer.csrf_matches(csrf_token):
        return _page("error.html", viewer, settings, 403, message="Log out from the dashboard's own page.")
    token = session_token(request)
    if token is not None:
        close_dashboard_session(engine, token)
    response = RedirectResponse("/ui/login", status_code=303)
    clear_session_cookie(response)
    return _secured(response)


@router.get("")
def overview(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    window: Annotated[str, Query(pattern="^(1h|6h|24h)$")] = "1h",
) -> Response:
    viewer = viewer_of(request)
    if viewer is None:
        return _to_login()
    chosen = WINDOWS[window]
    now = now_seconds()
    scope = viewer.tenant_scope
    activity = ledger.activity_by_model(
        engine, scope, until=now, bucket_seconds=chosen.bucket_seconds, buckets=chosen.buckets
    )
    charts = [
        line_chart(activity, "requests", chart_id="requests", title="Requests finished", unit="requests"),
        line_chart(activity, "billed_tokens", chart_id="tokens", title="Billed tokens", unit="tokens"),
        line_chart(
            activity, "cost_usd", chart_id="cost", title="Cost", unit="USD", exact=lambda v: f"{Decimal(v):f}"
        ),
    ]
    depths = ledger.queue_depth(engine, scope, now)
    hit_rate = activity.cache_hit_rate
    return _page(
        "overview.html",
        viewer,
        settings,
        window=chosen,
        windows=list(WINDOWS),
        charts=charts,
        totals={
            "requests": activity.total("requests"),
            "failed": activity.total("failed"),
            "cache_hits": activity.total("cache_hits"),
            "billed_tokens": activity.total("billed_tokens"),
            "cost": f"{activity.total('cost_usd'):f}",
            "cost_text": format_value(activity.total("cost_usd"), "USD"),
            "hit_rate": "none yet" if hit_rate is None else f"{hit_rate:.1%}",
        },
        depths=depths,
        queue={
            "unfinished": sum(d.unfinished for d in depths),
            "waiting": sum(d.waiting for d in depths),
            "running": sum(d.running for d in depths),
            "stale": sum(d.stale for d in depths),
        },
        workers=ledger.worker_leases(engine, now) if viewer.operator else None,
        now=now,
        recent=ledger.page_of_batches(engine, scope, limit=10).data,
    )


@router.get("/batches")
def batches(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    after: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
) -> Response:
    viewer = viewer_of(request)
    if viewer is None:
        return _to_login()
    page = ledger.page_of_batches(engine, viewer.tenant_scope, after=after, limit=PAGE_SIZE)
    return _page("batches.html", viewer, settings, page=page, after=after)


@router.get("/batches/{batch_id}")
def batch_page(request: Request, engine: EngineDep, settings: SettingsDep, batch_id: ObjectId) -> Response:
    viewer = viewer_of(request)
    if viewer is None:
        return _to_login()
    found = ledger.batch_summaries(engine, [batch_id], viewer.tenant_scope)
    if not found:
        # Another tenant's batch is an unknown batch: the same page, the same status.
        return _page("error.html", viewer, settings, 404, message="No such batch.")
    summary = found[0]
    return _page(
        "batch.html",
        viewer,
        settings,
        batch=summary,
        metadata=sorted(
            (str(key), value if isinstance(value, str) else json.dumps(value))
            for key, value in (summary.metadata or {}).items()
        ),
        errors=ledger.first_errors(engine, batch_id),
    )


@router.get("/progress")
def progress(
    request: Request,
    engine: EngineDep,
    batch: Annotated[list[str] | None, Query(max_length=MAX_POLLED)] = None,
) -> Response:
    """``{"data": [progress of each named batch the viewer may see]}``; what the bars poll."""
    viewer = viewer_of(request)
    if viewer is None:
        return _secured(JSONResponse({"error": {"message": "not logged in", "code": "login_required"}}, 401))
    ids = [batch_id for batch_id in (batch or [])[:MAX_POLLED] if _is_id(batch_id)]
    found = ledger.batch_summaries(engine, ids, viewer.tenant_scope)
    return _secured(JSONResponse({"data": [_progress(summary) for summary in found]}))


def _is_id(text: str) -> bool:
    return re.fullmatch(ID_PATTERN, text) is not None


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in _STATIC:
        return _secured(Response("not found", status_code=404, media_type="text/plain"))
    body = resources.files("api.dashboard").joinpath("static", name).read_bytes()
    response = Response(body, media_type=_STATIC[name])
    _secured(response)
    response.headers["Cache-Control"] = "public, max-age=300"
    return response
