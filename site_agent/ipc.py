"""The local socket between the thin ClientApp relay and the site agent's warm trainer.

A frame is a 4-byte big-endian header length, a UTF-8 JSON header, then the raw bytes of
each array the header lists (name, dtype, shape). Arrays travel as plain little-endian
buffers: nothing is ever unpickled. This module imports numpy but never torch, so the
relay process stays cheap to start.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ALLOWED_DTYPES", "IPCError", "read_frame", "request", "write_frame"]

ALLOWED_DTYPES = frozenset({"float32", "float64", "int64", "int32", "uint8"})
_MAX_HEADER = 1 << 20          # 1 MiB of JSON is far beyond any task header
_MAX_ARRAY_BYTES = 1 << 30     # 1 GiB per array


class IPCError(RuntimeError):
    """A malformed frame, or the other end went away."""


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise IPCError("connection closed mid-frame")
        buf.extend(chunk)
    return bytes(buf)


def write_frame(
    sock: socket.socket, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> None:
    """Send one frame: ``header`` (JSON-serialisable) and named numeric arrays."""
    specs = []
    blobs = []
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr)
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dtype.name not in ALLOWED_DTYPES:
            raise IPCError(f"array {name!r} has dtype {a.dtype}; allowed: {sorted(ALLOWED_DTYPES)}")
        a = a.astype(dtype.newbyteorder("<"), copy=False)
        specs.append({"name": name, "dtype": dtype.name, "shape": list(a.shape)})
        blobs.append(a.tobytes())
    head = json.dumps({**header, "arrays": specs}, allow_nan=True).encode()
    sock.sendall(struct.pack(">I", len(head)) + head)
    for blob in blobs:
        sock.sendall(blob)


def read_frame(sock: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Receive one frame written by :func:`write_frame`; validates every size first."""
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > _MAX_HEADER:
        raise IPCError(f"header of {n} bytes exceeds the {_MAX_HEADER}-byte limit")
    try:
        header = json.loads(_recv_exact(sock, n))
    except ValueError as err:
        raise IPCError(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise IPCError("header must be a JSON object")
    specs = header.pop("arrays", [])
    if not isinstance(specs, list):
        raise IPCError("'arrays' must be a list")
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        try:
            name = str(spec["name"])
            dtype = np.dtype(str(spec["dtype"])).newbyteorder("<")
            shape = tuple(int(d) for d in spec["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise IPCError(f"bad array spec {spec!r}: {err}") from None
        if dtype.name not in ALLOWED_DTYPES or any(d < 0 for d in shape):
            raise IPCError(f"array {name!r}: dtype {dtype.name} / shape {shape} not allowed")
        # Python ints: np.prod in int64 wraps around for a huge shape and would pass.
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > _MAX_ARRAY_BYTES:
            raise IPCError(f"array {name!r} of {nbytes} bytes exceeds the limit")
        arrays[name] = np.frombuffer(_recv_exact(sock, nbytes), dtype=dtype).reshape(shape)
    return header, arrays


def request(
    path: str | os.PathLike[str],
    header: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    *,
    timeout: float,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One request/response exchange with the trainer listening on the Unix socket ``path``."""
    if not Path(path).exists():
        raise IPCError(f"the site agent's trainer socket {path} does not exist: is the "
                       "site agent running?")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
            write_frame(sock, header, arrays)
            return read_frame(sock)
        except (OSError, struct.error) as err:
            raise IPCError(f"trainer exchange failed: {err}") from None
