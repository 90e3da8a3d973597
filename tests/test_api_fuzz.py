"""Fuzzing and hostile requests against the coordinator's REST API.

schemathesis generates requests for every operation from the API's own OpenAPI schema,
twice: valid data (the answers must match the schema) and data that breaks it (wrong
types, missing and unknown fields, bodies that are not JSON, odd parameters: every answer
must be a 4xx that says why). Neither may ever get a 5xx. Bounded: a few derandomized
examples per operation. Then hand-written hostile requests, each checked for its reason:
malformed JSON, bodies over the size limit with and without Content-Length (against a
real uvicorn server, so what is tested is that the server answers before the body ends),
unknown fields and wrong types.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis import GenerationMode
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from coordinator.api import create_app
from coordinator.auth import create_user
from coordinator.body_limit import MAX_BODY_BYTES
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.settings import Settings

from tests_support import served_app

TOO_LARGE = "request body too large: this API accepts at most 1 MiB (1048576 bytes)"
_FUZZ_SETTINGS = hypothesis.settings(max_examples=8, deadline=None, derandomize=True,
                                     suppress_health_check=list(hypothesis.HealthCheck),
                                     database=None)
# Breaking the schema has more ways (per field: type, bounds, pattern, extra keys, syntax).
_NEGATIVE_SETTINGS = hypothesis.settings(_FUZZ_SETTINGS, max_examples=15)


def _app(tmp: Path) -> tuple[FastAPI, str]:
    settings = Settings(home=tmp)
    url = settings.effective_database_url
    run_migrations(url)
    engine = make_engine(url)
    with session_scope(engine) as session:
        _user, token = create_user(session, name="fuzz-admin", role="admin")
    return create_app(settings=settings, engine=engine), token


def _token_for(case: schemathesis.Case, app: FastAPI, token: str) -> str:
    """The fuzzing admin's token, or for a logout (which revokes the token it is sent
    with) a throwaway admin's."""
    if not case.operation.path.endswith("/logout"):
        return token
    with session_scope(app.state.engine) as session:
        _user, throwaway = create_user(session, name=f"fuzz-{secrets.token_hex(6)}",
                                       role="admin")
    return throwaway


@pytest.fixture(scope="module")
def app_and_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, str]]:
    yield _app(tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def served(app_and_token: tuple[FastAPI, str]) -> Iterator[tuple[str, int]]:
    """The app behind a real uvicorn on a free 127.0.0.1 port: (host, port)."""
    with served_app(app_and_token[0], name="fuzz-uvicorn") as port:
        yield "127.0.0.1", port


def _reason(response: httpx.Response) -> str | None:
    """The reason a refusal gives (``message`` of a 422, else ``detail``), if any."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict):
        return None
    reason = body.get("message") or body.get("detail")
    return reason if isinstance(reason, str) and reason.strip() else None


def _echoes_input(response: httpx.Response) -> bool:
    body = response.json()
    detail = body.get("detail") if isinstance(body, dict) else None
    return isinstance(detail, list) and any(
        isinstance(e, dict) and "input" in e for e in detail)


# --- schemathesis ------------------------------------------------------------------------


def test_valid_data_never_gets_5xx_and_answers_match_the_schema(
        app_and_token: tuple[FastAPI, str]) -> None:
    app, token = app_and_token
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    client = TestClient(app)
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @_FUZZ_SETTINGS
        @hypothesis.given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            case.headers = {**(case.headers or {}),
                            "Authorization": f"Bearer {_token_for(case, app, token)}"}
            response = case.call(session=client)
            # This app runs without Flower (no launcher): the routes that start runs answer
            # their documented 503 saying so; any other 5xx is a failure.
            unconfigured = (response.status_code == 503
                            and "not configured on this coordinator" in response.text)
            if response.status_code >= 500 and not unconfigured:
                failures.append(f"{case.method} {case.formatted_path}: "
                                f"{response.status_code} {response.text[:200]}")
            case.validate_response(response, checks=(
                status_code_conformance, content_type_conformance,
                response_schema_conformance), excluded_checks=())

        check()
    assert not failures, "\n".join(failures)


def test_data_that_breaks_the_schema_gets_4xx_with_a_reason(
        app_and_token: tuple[FastAPI, str]) -> None:
    app, token = app_and_token
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    client = TestClient(app)
    auth = {"Authorization": f"Bearer {token}"}
    failures: list[str] = []
    fuzzed: set[str] = set()
    bodies = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @_NEGATIVE_SETTINGS
        @hypothesis.given(case=operation.as_strategy(GenerationMode.NEGATIVE, headers=auth))
        def check(case: schemathesis.Case) -> None:
            nonlocal bodies
            if case.operation.path.endswith("/logout"):
                case.headers = {**(case.headers or {}),
                                "Authorization": f"Bearer {_token_for(case, app, token)}"}
            response = case.call(session=client)
            fuzzed.add(case.operation.label)
            negated = {location for location, info in case.meta.components.items()
                       if info.mode is GenerationMode.NEGATIVE} if case.meta else set()
            bodies += ParameterLocation.BODY in negated
            how = getattr(getattr(case.meta and case.meta.phase, "data", None),
                          "description", "")
            where = f"{case.method} {case.formatted_path} ({how})"
            code = response.status_code
            if code >= 500:
                failures.append(f"{where}: {code} {response.text[:200]}")
            elif ParameterLocation.BODY in negated and code < 400:
                # Unknown query parameters are ignored (as HTTP APIs do), but a body that
                # breaks the schema must be refused.
                failures.append(f"{where}: body {case.body!r:.200} accepted with {code}")
            elif code >= 400 and _reason(response) is None:
                failures.append(f"{where}: {code} without a JSON reason: {response.text[:200]}")
            elif code >= 400 and _echoes_input(response):
                failures.append(f"{where}: {code} echoes the input: {response.text[:200]}")

        try:
            check()
        except hypothesis.errors.Unsatisfiable:
            # Nothing of this operation can break the schema: no body, and no parameter
            # but the token or free-form strings.
            continue
    assert not failures, "\n".join(failures)
    assert len(fuzzed) >= 20 and bodies >= 100, (sorted(fuzzed), bodies)  # it did run


# --- hand-written hostile requests -------------------------------------------------------


@pytest.mark.parametrize(("content", "content_type", "code", "reason"), [
    (b'{\n  "name": "p1",\n  "description": oops\n}', "application/json", 422,
     "body: the request body is not valid JSON (line 3, column 18): Expecting value"),
    (b'{"name": "p1"', "application/json", 422,
     "body: the request body is not valid JSON (line 1, column 14): Expecting ',' delimiter"),
    (b"", "application/json", 422, "body: the request body is missing: send a JSON object"),
    (b'["p1"]', "application/json", 422,
     "body: the request body must be a JSON object ({...})"),
    (b'{"name": "p1"}', "text/plain", 422,
     "body: the request body must be a JSON object sent with 'Content-Type: application/json'"),
    (b'{"name": "p\xff1"}', "application/json", 400,
     "the request body is not valid JSON: it is not UTF-8 text"),
    (b'{"name": ' + b"9" * 5000 + b"}", "application/json", 400,
     "the request body is not valid JSON: a number in it has more than 4300 digits"),
], ids=["syntax", "truncated", "empty", "list", "not-sent-as-json", "not-utf8", "huge-number"])
def test_malformed_json_gets_a_plain_reason(
        app_and_token: tuple[FastAPI, str], content: bytes, content_type: str, code: int,
        reason: str) -> None:
    app, token = app_and_token
    with TestClient(app) as c:
        r = c.post("/api/v1/projects", content=content, headers={
            "Authorization": f"Bearer {token}", "content-type": content_type})
    assert r.status_code == code, r.text
    assert _reason(r) == reason


def _raw_exchange(address: tuple[str, int], head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send only a request's head; read the answer until the server closes."""
    with socket.create_connection(address, timeout=10) as conn:
        conn.sendall(head)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    header, _, body = data.partition(b"\r\n\r\n")
    lines = header.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_content_length_over_the_limit_is_refused_before_the_body_is_sent(
        app_and_token: tuple[FastAPI, str], served: tuple[str, int]) -> None:
    token = app_and_token[1]
    head = (f"POST /api/v1/projects HTTP/1.1\r\nHost: {served[0]}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {50 * 1024 * 1024}\r\n\r\n").encode()
    started = time.monotonic()
    code, headers, body = _raw_exchange(served, head)  # not one byte of the 50 MiB sent
    assert code == 413
    assert json.loads(body)["detail"].startswith(TOO_LARGE)
    assert headers["connection"] == "close"
    assert time.monotonic() - started < 5  # answered, not waiting for the body


def test_a_huge_json_body_is_413_with_the_limit(
        app_and_token: tuple[FastAPI, str], served: tuple[str, int]) -> None:
    token = app_and_token[1]
    r = httpx.post(f"http://{served[0]}:{served[1]}/api/v1/projects",
                   json={"name": "x" * 10_000_000},
                   headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 413
    assert (_reason(r) or "").startswith(TOO_LARGE)
    assert len(r.content) < 1000


def test_a_chunked_body_is_cut_off_once_over_the_limit(
        app_and_token: tuple[FastAPI, str], served: tuple[str, int]) -> None:
    token = app_and_token[1]
    chunk, chunks = b"x" * 65536, 1024  # 64 MiB offered, in 64 KiB chunks, no Content-Length
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(chunks):
            sent += len(chunk)
            yield chunk

    r = httpx.post(f"http://{served[0]}:{served[1]}/api/v1/projects", content=body(),
                   headers={"Authorization": f"Bearer {token}",
                            "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert (_reason(r) or "").startswith(TOO_LARGE)
    assert r.headers["connection"] == "close"
    # The server answered and closed long before the end; what was sent beyond the limit
    # sat in the sockets' buffers (a few MiB on loopback).
    assert sent < len(chunk) * chunks // 2, f"{sent} bytes sent"


def test_a_body_at_the_limit_is_read_and_its_value_not_echoed(
        app_and_token: tuple[FastAPI, str]) -> None:
    app, token = app_and_token
    filler = "y" * (MAX_BODY_BYTES - len(b'{"name": ""}'))
    content = json.dumps({"name": filler}).encode()
    assert len(content) == MAX_BODY_BYTES
    with TestClient(app) as c:
        r = c.post("/api/v1/projects", content=content, headers={
            "Authorization": f"Bearer {token}", "content-type": "application/json"})
    assert r.status_code == 422
    assert _reason(r) == "name: String should match pattern '^[a-z0-9][a-z0-9_-]{0,63}$'"
    assert len(r.content) < 1000 and "yyyy" not in r.text and not _echoes_input(r)


def _post_run(app: FastAPI, token: str, **fields: Any) -> httpx.Response:
    body = {"project": "p", "task": "breast_cancer_mlp", "rounds": 2, "epsilon": 1, **fields}
    with TestClient(app) as c:
        return c.post("/api/v1/runs", json=body, headers={"Authorization": f"Bearer {token}"})


def test_an_unknown_field_is_named_and_its_value_not_echoed(
        app_and_token: tuple[FastAPI, str]) -> None:
    r = _post_run(*app_and_token, typo_field="hunter2-do-not-echo")
    assert r.status_code == 422
    assert _reason(r) == "typo_field: Extra inputs are not permitted"
    assert "hunter2" not in r.text and not _echoes_input(r)


def test_wrong_types_are_named_with_what_was_expected(
        app_and_token: tuple[FastAPI, str]) -> None:
    r = _post_run(*app_and_token, rounds="lots-of-rounds", epsilon=[1])
    assert r.status_code == 422
    assert _reason(r) == ("rounds: Input should be a valid integer; "
                          "epsilon: Input should be a valid number")
    assert "lots-of-rounds" not in r.text and not _echoes_input(r)
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "rounds"], ["body", "epsilon"]]
    # Nothing is coerced: a number in a string, or true for a number, is a wrong type too.
    r = _post_run(*app_and_token, rounds="5", epsilon=True)
    assert r.status_code == 422
    assert _reason(r) == ("rounds: Input should be a valid integer; "
                          "epsilon: Input should be a valid number")
    # An integer where a number is expected is a number.
    assert _post_run(*app_and_token, epsilon=3).status_code != 422
