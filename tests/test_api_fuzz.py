"""Property-based fuzzing of the coordinator's REST API from its own OpenAPI schema.

schemathesis generates requests for every operation (valid and invalid bodies, odd
parameters); the API must never answer 5xx and its answers must match its schema. Bounded:
a few examples per operation, a deadline per example.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from coordinator.api import create_app, create_user
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.settings import Settings


def _app(tmp: Path) -> tuple[FastAPI, str]:
    settings = Settings(home=tmp)
    url = settings.effective_database_url
    run_migrations(url)
    engine = make_engine(url)
    with session_scope(engine) as session:
        _user, token = create_user(session, name="fuzz-admin", role="admin")
    return create_app(settings=settings, engine=engine), token


@pytest.fixture(scope="module")
def app_and_token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FastAPI, str]]:
    yield _app(tmp_path_factory.mktemp("fuzz"))


def test_no_server_errors_and_answers_match_the_schema(
        app_and_token: tuple[FastAPI, str]) -> None:
    app, token = app_and_token
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    client = TestClient(app)
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.settings(max_examples=8, deadline=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck),
                             database=None)
        @hypothesis.given(case=operation.as_strategy())
        def check(case: schemathesis.Case) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
            response = case.call(session=client)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: "
                                f"{response.status_code} {response.text[:200]}")
            case.validate_response(response, checks=(
                status_code_conformance, content_type_conformance,
                response_schema_conformance), excluded_checks=())

        check()
    assert not failures, "\n".join(failures)


def test_malformed_json_huge_body_unknown_field_and_wrong_type_get_4xx(
        app_and_token: tuple[FastAPI, str]) -> None:
    app, token = app_and_token
    auth = {"Authorization": f"Bearer {token}"}
    with TestClient(app) as c:
        r = c.post("/api/v1/projects", content=b"{not json", headers={
            **auth, "content-type": "application/json"})
        assert r.status_code == 422
        r = c.post("/api/v1/projects", json={"name": "x" * 10_000_000}, headers=auth)
        assert 400 <= r.status_code < 500
        r = c.post("/api/v1/runs", json={"project": "p", "task": "breast_cancer_mlp",
                                         "rounds": 2, "epsilon": 1, "typo_field": 1},
                   headers=auth)
        assert r.status_code == 422 and "typo_field" in r.json()["message"]
        r = c.post("/api/v1/runs", json={"project": "p", "task": "breast_cancer_mlp",
                                         "rounds": "many", "epsilon": 1}, headers=auth)
        assert r.status_code == 422 and "rounds" in r.json()["message"]
