"""A cap on the uploads one tenant has in flight in one API process.

An upload's body is spooled to a temporary file while it arrives (Starlette's form parser, and
before it the Idempotency-Key middleware when that header is sent), each bounded by
``max_upload_bytes`` but not in number: one tenant holding many large or slow-dripping uploads
open filled the temporary disk (measured: 8 held uploads of 20 MiB, 100 MiB of temp space, and
every other tenant's upload answered 507) and held as many connections. Here the key is looked up
before anything of the body is read; a tenant already at its cap is answered 429
``too_many_uploads_in_flight`` at once, its body never read."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import scope_tenant
from api.errors import RateLimitExceeded, Unauthenticated, api_error_response

__all__ = ["TOO_MANY_UPLOADS_IN_FLIGHT", "UPLOAD_RETRY_AFTER_SECONDS", "UploadsInFlight"]

TOO_MANY_UPLOADS_IN_FLIGHT = "too_many_uploads_in_flight"
# When a refused upload may ask again: an upload in flight ends within seconds on a working
# connection (the openai SDK waits this long before its own retry).
UPLOAD_RETRY_AFTER_SECONDS = 5.0


class UploadsInFlight:
    """ASGI middleware: at most ``per_tenant`` POSTs to ``upload_paths`` of one tenant at once.

    Runs outside every part that reads the body. A slot is held until the request's answer is
    done or it failed in any way (a client gone mid-body included)."""

    def __init__(self, app: ASGIApp, *, per_tenant: int, upload_paths: tuple[str, ...]) -> None:
        self.app = app
        self.per_tenant = per_tenant
        self.upload_paths = upload_paths
        # Uploads in flight by tenant id (only tenants with one); the event loop's alone.
        self.in_flight: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.upload_paths:
            await self.app(scope, receive, send)
            return
        try:
            tenant = await scope_tenant(scope)
        except Unauthenticated as error:
            await api_error_response(error)(scope, receive, send)
            return
        held = self.in_flight.get(tenant.id, 0)
        if held >= self.per_tenant:
            refused = RateLimitExceeded(
                f"this tenant already has {held} uploads in flight, the most one API process takes "
                "at once; retry once one of them has finished",
                code=TOO_MANY_UPLOADS_IN_FLIGHT,
            )
            refused.retry_after = UPLOAD_RETRY_AFTER_SECONDS
            await api_error_response(refused)(scope, receive, send)
            return
        self.in_flight[tenant.id] = held + 1
        try:
            await self.app(scope, receive, send)
        finally:
            left = self.in_flight[tenant.id] - 1
            if left:
                self.in_flight[tenant.id] = left
            else:
                del self.in_flight[tenant.id]
