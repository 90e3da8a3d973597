"""What the site gateway forwards to the SuperLink, and how: Flower's fleet API only.

A fleet request goes on only with the site's own Flower node key
(:func:`checked_headers`); its body is streamed to the SuperLink and the answer back
(:func:`forward`), never held whole.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import httpx

from coordinator.gateway_http import Headers, Refused, next_event, send

__all__ = ["MAX_FLEET_BODY", "checked_headers", "forward", "forwardable", "make_upstream"]

# The exact shape of every path forwarded: Flower's fleet calls are /v1/fleet/<name>. Nothing
# that a client library or the SuperLink could normalise into another path (``..``, ``//``,
# percent-escapes, backslashes) matches, so the path checked is the path the SuperLink sees.
_FORWARDABLE = re.compile(r"^(?:/v1/fleet/[a-z0-9][a-z0-9-]{0,63}|/health)$")
_NODE_KEY = b"flwr-public-key"
# Flower's node authentication headers. The gateway checks the key and the SuperLink the
# signature; if either could see another copy than the one checked, a site's certificate
# could carry another node's signed requests. Each may appear once, and only the value
# checked is forwarded.
_FLOWER_AUTH = (_NODE_KEY, b"flwr-signature", b"flwr-timestamp")
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
               b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host",
               b"content-length"}
# What a client says about forwarding is not the gateway's word: the SuperLink would log
# (and its server could trust) an address the site made up.
_CLIENT_FORWARDING = {b"forwarded", b"x-forwarded-for", b"x-forwarded-host",
                      b"x-forwarded-proto", b"x-forwarded-port", b"x-forwarded-prefix",
                      b"x-forwarded-server", b"x-real-ip", b"x-client-ip", b"true-client-ip",
                      b"via"}
MAX_FLEET_BODY = 512 * 1024 * 1024


def forwardable(path: str) -> bool:
    """Whether ``path`` is one the gateway forwards (a fleet call or ``/health``)."""
    return _FORWARDABLE.fullmatch(path) is not None


def make_upstream(superlink: str, ca_cert: Path) -> httpx.AsyncClient:
    """The HTTP client that reaches the SuperLink's fleet API (built on the gateway's loop).

    ``superlink`` is ``unix:/path`` for the SuperLink's socket in the coordinator's data
    directory (TLS still checks its 127.0.0.1 certificate), or ``host:port``.
    """
    ca = ssl.create_default_context(cafile=str(ca_cert))
    if superlink.startswith("unix:"):
        return httpx.AsyncClient(
            base_url="https://127.0.0.1", timeout=120.0,
            transport=httpx.AsyncHTTPTransport(uds=superlink[5:], verify=ca))
    return httpx.AsyncClient(base_url=f"https://{superlink}", verify=ca, timeout=120.0)


def checked_headers(request: h11.Request, path: str, site: str, node_key: bytes) -> Headers:
    """The headers to forward: Flower's authentication headers once each, as checked;
    no hop-by-hop or client-made forwarding headers. ``node_key`` is the key registered for
    ``site``, the site of the client's verified certificate."""
    seen: dict[bytes, list[bytes]] = {name: [] for name in _FLOWER_AUTH}
    forwarded: Headers = []
    for name, value in request.headers:
        canonical = name.lower().replace(b"_", b"-")
        if canonical in seen:
            seen[canonical].append(value)
        elif canonical not in _HOP_BY_HOP and canonical not in _CLIENT_FORWARDING:
            forwarded.append((name, value))
    repeated = [n.decode() for n, values in seen.items() if len(values) > 1]
    if repeated:
        raise Refused(400, "repeated-header", f"{path}: refused: the request carries "
                       f"{', '.join(repeated)} more than once; each Flower authentication "
                       "header may appear once")
    if path.startswith("/v1/fleet/"):
        # Flower signs every fleet request with the node key and sends that key along;
        # a request without one is refused here rather than left to the SuperLink.
        if not seen[_NODE_KEY]:
            raise Refused(403, "no-node-key", f"{path}: forbidden: fleet requests must "
                           "carry the site's Flower node key (flwr-public-key)")
        try:
            key = base64.b64decode(seen[_NODE_KEY][0], validate=True)
        except ValueError:
            key = b""
        if key != node_key:
            raise Refused(403, "foreign-node-key", f"{path}: forbidden: the Flower node "
                           f"key does not belong to site {site!r}")
    return forwarded + [(name, values[0]) for name, values in seen.items() if values]


async def forward(upstream_client: httpx.AsyncClient, conn: h11.Connection,
                  reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  request: h11.Request, method: str, path: str, headers: Headers, *,
                  timeout: float) -> None:
    """Stream the request body to the SuperLink and its answer back, chunk by chunk."""
    length = next((int(v) for k, v in request.headers if k == b"content-length"), None)
    if length is not None and length > MAX_FLEET_BODY:
        raise Refused(413, "body-too-large", f"request body too large: at most "
                                              f"{MAX_FLEET_BODY} bytes")
    if length is not None:
        headers = [*headers, (b"content-length", str(length).encode())]

    async def body() -> AsyncIterator[bytes]:
        total = 0
        while True:
            event = await next_event(conn, reader, timeout)
            if isinstance(event, h11.Data):
                total += len(event.data)
                if total > MAX_FLEET_BODY:
                    raise ConnectionError("fleet request body over the limit")
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise ConnectionError("the client closed the connection mid-request")

    upstream = upstream_client.build_request(method, path, headers=headers, content=body())
    try:
        resp = await upstream_client.send(upstream, stream=True)
    except httpx.HTTPError as err:
        if conn.their_state is not h11.DONE:
            raise ConnectionError("request body not delivered upstream") from err
        await send(conn, writer, 502, [(b"content-type", b"application/json")],
                   json.dumps({"detail": "the coordinator's SuperLink is not "
                               f"reachable ({type(err).__name__}); retry later"}
                              ).encode(), timeout=timeout)
        return
    try:
        out = [(k.encode(), v.encode()) for k, v in resp.headers.items()
               if k.lower().encode() not in _HOP_BY_HOP or k.lower() == "content-length"]
        writer.write(conn.send(h11.Response(status_code=resp.status_code, headers=out))
                     or b"")
        async for chunk in resp.aiter_raw():
            writer.write(conn.send(h11.Data(data=chunk)) or b"")
            await asyncio.wait_for(writer.drain(), timeout)
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await asyncio.wait_for(writer.drain(), timeout)
    except httpx.HTTPError as err:
        raise ConnectionError(f"the SuperLink's answer broke off: {err}") from err
    finally:
        await resp.aclose()

# -- enrollment ---------------------------------------------------------------------

