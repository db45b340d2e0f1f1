"""Request size limits, enforced while the body streams in (a missing or lying Content-Length
cannot get around them)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import PayloadTooLarge

__all__ = ["BodySizeLimit"]


class BodySizeLimit:
    """Reject bodies over ``upload_limit`` on ``upload_paths`` and over ``body_limit`` elsewhere."""

    def __init__(
        self, app: ASGIApp, *, body_limit: int, upload_limit: int, upload_paths: tuple[str, ...]
    ) -> None:
        self.app = app
        self.body_limit = body_limit
        self.upload_limit = upload_limit
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_upload = scope["path"] in self.upload_paths
        limit = self.upload_limit if is_upload else self.body_limit
        what = "an upload" if is_upload else "a request body"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _reject(send, f"{what} of {int(declared)} bytes is over the limit of {limit} bytes")
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"{what} is over the limit of {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


async def _reject(send: Send, message: str) -> None:
    error = PayloadTooLarge(message)
    body = json.dumps(error.body()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
