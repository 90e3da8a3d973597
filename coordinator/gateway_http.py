"""One HTTP/1.1 conversation of the site gateway: read a request, answer it, or refuse it.

h11 parses; every read and write has the gateway's deadline (``idle_timeout_s``). A refusal
(:class:`Refused`) is answered and the connection closed; :class:`Drop` closes it without
an answer.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from typing import Any

import h11

__all__ = ["SMALL_BODY", "Client", "Drop", "Headers", "Refused", "body_pending", "linger",
           "next_event", "send", "small_body"]

SMALL_BODY = 16 * 1024   # enrollment, renewal, CA: a CSR and a token fit many times over
_LINGER_BYTES = 64 * 1024   # read and dropped after a refusal, so the client sees the answer

Headers = list[tuple[bytes, bytes]]


@dataclass
class Client:
    """Who is on the other end of one connection."""

    address: str
    site: str | None = None      # from a verified client certificate
    serial: str | None = None
    served: int = 0              # requests answered on this connection


class Refused(Exception):
    """A request the gateway answers with an error, and then closes the connection."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.kind, self.detail = status, kind, detail


class Drop(Exception):
    """Close the connection without an answer (the client retries on a new one)."""


async def next_event(conn: h11.Connection, reader: asyncio.StreamReader, timeout: float) -> Any:
    """The next h11 event of the connection, reading as needed within ``timeout`` s a read."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await asyncio.wait_for(reader.read(65536), timeout)
        conn.receive_data(data)


async def linger(reader: asyncio.StreamReader) -> None:
    """Read (and drop) a little of an unread body, so the client gets the answer
    instead of a reset; never more than :data:`_LINGER_BYTES` or a second."""
    left = _LINGER_BYTES
    deadline = time.monotonic() + 1.0
    try:
        while left > 0 and (wait := deadline - time.monotonic()) > 0:
            data = await asyncio.wait_for(reader.read(min(left, 16384)), wait)
            if not data:
                return
            left -= len(data)
    except (TimeoutError, ConnectionError, ssl.SSLError):
        return


async def send(conn: h11.Connection, writer: asyncio.StreamWriter, status: int,
               headers: Headers, content: bytes, *, timeout: float, close: bool = False
               ) -> None:
    """Send one whole response (with its length; ``close`` adds ``connection: close``)."""
    headers = [*headers, (b"content-length", str(len(content)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
    writer.write(conn.send(h11.Data(data=content)) or b"")
    writer.write(conn.send(h11.EndOfMessage()) or b"")
    await asyncio.wait_for(writer.drain(), timeout)


async def small_body(conn: h11.Connection, reader: asyncio.StreamReader,
                     request: h11.Request, timeout: float) -> bytes:
    """The whole body of an enrollment, renewal or CA request, at most SMALL_BODY."""
    too_large = Refused(413, "body-too-large", f"request body too large: at most "
                                                f"{SMALL_BODY} bytes on this path")
    for name, value in request.headers:
        if name == b"content-length" and int(value) > SMALL_BODY:
            raise too_large   # refused on the head: not a byte of it is read
    body = bytearray()
    while True:
        event = await next_event(conn, reader, timeout)
        if isinstance(event, h11.Data):
            body.extend(event.data)
            if len(body) > SMALL_BODY:
                raise too_large
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:
            raise ConnectionError("the client closed the connection mid-request")


def body_pending(conn: h11.Connection) -> bool:
    """Whether the client may still be sending a body (drops what h11 already holds)."""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return True
            if not isinstance(event, h11.Data):
                return False
    except h11.RemoteProtocolError:
        return False

