"""The API's cap on request bodies: an ASGI middleware that answers 413 with a reason.

Every request body of the coordinator's API is a small JSON document or the portal's login
form; nothing is uploaded, so a large body is refused before it is read further.
"""

from __future__ import annotations

import json
from typing import Final

from fastapi import HTTPException, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["MAX_BODY_BYTES", "BodySizeLimit"]

# Every request body of this API is a small JSON document (its largest fields, a node key
# or an intended use, are a few KiB) or the portal's login form; nothing is uploaded. 1 MiB
# leaves room to spare and keeps a single request from holding much memory.
MAX_BODY_BYTES: Final = 1024 * 1024


def _too_large_reason(limit: int) -> str:
    size = f"{limit // (1024 * 1024)} MiB" if limit % (1024 * 1024) == 0 else f"{limit} bytes"
    return (f"request body too large: this API accepts at most {size} ({limit} bytes) per "
            "request. Its requests are small JSON documents; check what is being sent (a "
            "file or a data set does not belong in an API request)")


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit.

    An ``HTTPException`` so that FastAPI, which turns any other error while reading a body
    into "There was an error parsing the body", passes it on to its handler as a 413.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE, _too_large_reason(limit),
                         headers={"Connection": "close"})


class BodySizeLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 and a reason.

    A ``Content-Length`` over the limit is refused before any of the body is read; a body
    without one (chunked) is counted as it arrives and refused once it passes the limit, so
    at most the limit plus one chunk is ever held. The answer says ``Connection: close``: the
    server then stops reading the rest rather than receiving it only to discard it.

    Args:
        app: The application to protect.
        max_bytes: The largest body accepted.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lengths = [v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"]
        if any(not v.strip().isdigit() for v in lengths):
            await _send_json(send, status.HTTP_400_BAD_REQUEST,
                             "the Content-Length header is not a whole number of bytes")
            return
        if any(int(v) > self.max_bytes for v in lengths):
            await _send_json(send, status.HTTP_413_CONTENT_TOO_LARGE,
                             _too_large_reason(self.max_bytes))
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except _BodyTooLarge as exc:  # read outside FastAPI's handlers (e.g. a mounted app)
            if started:
                raise
            await _send_json(send, exc.status_code, str(exc.detail))


async def _send_json(send: Send, code: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": code, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})

