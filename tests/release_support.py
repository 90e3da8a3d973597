"""Helpers for the release workflow's tests: a real (tiny, quickly trained) breast-cancer
model, runs recorded as the ServerApp records them, users, parity evaluators that stand in
for the sites, and the warnings those tests expect.

What the sites would measure (export parity on their held-out data) is stood in for by
:class:`LocalParityForTests`, which runs the very function a site runs, on rows from
scikit-learn's copy of the data set.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score
from sqlalchemy import Engine
from sqlmodel import col, select
from torch.nn import functional as F

from coordinator.auth import create_user
from coordinator.checkpoints import load_checkpoint, save_checkpoint
from coordinator.db import session_scope
from coordinator.models import AuditEvent, Checkpoint, Project, ReleaseCandidate, Run
from coordinator.repository import finish_run, mark_run_started
from coordinator.round_records import (
    finish_round,
    record_checkpoint,
    record_site_metrics,
    start_round,
)
from export.bundle_format import ArtefactFormat
from export.parity import parity_report
from fedward.models import model_arrays, set_model_arrays
from fedward.run_config import RunConfig
from fedward.tasks import build_model

from api_support import TestClient, api

# torch 2.13's ONNX exporter trips its own pytree deprecation shim (see test_export_formats);
# flwr's FAB builder (the app bundle hash in every lineage) asks pathspec for a style it
# deprecates (see test_coordinator_engine_units). Both harmless, neither ours to fix.
KNOWN_WARNINGS = [
    pytest.mark.filterwarnings(
        r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings(
        r"ignore:GitWildMatchPattern \('gitwildmatch'\) is deprecated:DeprecationWarning"),
]

SITES = ("hospital-a", "hospital-b")
PASSWORD = "correct horse battery staple"
INTENDED_USE = ("Second reader for fine-needle aspirate reports in adults; not for "
                "screening, not for children, never the only basis of a diagnosis.")
FORMATS = ("onnx", "onnx-int8", "openvino")


# --- a real model and the data that stands in for the sites' held-out splits ---------------


@functools.cache
def _data() -> tuple[np.ndarray, np.ndarray]:
    data = load_breast_cancer()
    return np.asarray(data.data, dtype=np.float32), np.asarray(data.target, dtype=np.int64)


@functools.cache
def trained_arrays() -> dict[str, np.ndarray]:
    """A breast-cancer MLP trained for a moment (classes are not all one): its arrays."""
    x, y = _data()
    model = build_model("breast_cancer_mlp", seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(xt), yt).backward()  # type: ignore[no-untyped-call]
        opt.step()
    return model_arrays(model)


def site_rows(sites: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each stand-in site's held-out rows: the data set split evenly, in order."""
    x, y = _data()
    return {s: (xs, ys) for s, xs, ys in zip(sites, np.array_split(x, len(sites)),
                                             np.array_split(y, len(sites)), strict=True)}


def real_metrics(arrays: Mapping[str, np.ndarray], sites: Sequence[str]
                 ) -> dict[str, dict[str, float]]:
    """AUC and accuracy the model really reaches on each stand-in site's rows."""
    model = build_model("breast_cancer_mlp")
    set_model_arrays(model, dict(arrays))
    model.eval()
    out = {}
    for site, (x, y) in site_rows(sites).items():
        with torch.no_grad():
            probs = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
        out[site] = {"auc": float(roc_auc_score(y, probs[:, 1])),
                     "accuracy": float(np.mean(probs.argmax(axis=1) == y))}
    return out


class LocalParityForTests:
    """TEST DOUBLE for the sites' parity measurement; never use it in a coordinator.

    Runs :func:`export.parity.parity_report`, the function a site runs on its held-out data,
    here in the test process on scikit-learn rows split among the run's sites, and returns
    the same figures a site sends back.
    """

    def __init__(self, *, engine: Engine, home: Path) -> None:
        self.engine = engine
        self.home = home
        self.calls: list[tuple[int, int, dict[str, Path]]] = []

    def evaluate(self, *, run_id: int, candidate_id: int,
                 artefacts: dict[str, Path]) -> dict[str, dict[str, dict[str, float]]]:
        self.calls.append((run_id, candidate_id, dict(artefacts)))
        with session_scope(self.engine) as session:
            cand = session.get(ReleaseCandidate, candidate_id)
            run = session.get(Run, run_id)
            assert cand is not None and run is not None
            ckpt = session.exec(select(Checkpoint).where(
                Checkpoint.run_id == run_id,
                Checkpoint.round_number == cand.round_number)).one()
            sites = RunConfig.model_validate_json(run.config_json).sites
            task, path, sha = run.task, ckpt.path, ckpt.sha256
        model = build_model(task)
        set_model_arrays(model, load_checkpoint(self.home / path, expected_sha256=sha))
        out: dict[str, dict[str, dict[str, float]]] = {}
        for site, (x, _y) in site_rows(sites).items():
            for fmt, artefact in artefacts.items():
                report = parity_report(torch_model=model, artefact_path=artefact,
                                       fmt=cast(ArtefactFormat, fmt), features=x)
                out.setdefault(site, {})[fmt] = {"max_abs_diff": report.max_abs_diff,
                                                 "agreement": report.agreement,
                                                 "n": float(report.n)}
        return out


class FixedParity:
    """A parity evaluator that returns given figures, or raises (for gate-failure tests)."""

    def __init__(self, result: Any = None, *, fail: Exception | None = None) -> None:
        self.result = result
        self.fail = fail

    def evaluate(self, *, run_id: int, candidate_id: int,
                 artefacts: dict[str, Path]) -> dict[str, dict[str, dict[str, float]]]:
        if self.fail is not None:
            raise self.fail
        return self.result  # type: ignore[no-any-return]


def good_figures(sites: Sequence[str] = SITES) -> dict[str, dict[str, dict[str, float]]]:
    return {s: {f: {"max_abs_diff": 1e-6, "agreement": 1.0, "n": 100.0} for f in FORMATS}
            for s in sites}


# --- recording a run as the ServerApp would ------------------------------------------------


def seed_run(engine: Engine, home: Path, *, project: str = "cardio",
             task: str = "breast_cancer_mlp", arrays: Mapping[str, np.ndarray] | None = None,
             rounds: int = 3, sites: Sequence[str] = SITES, budget: float = 3.0,
             final: Mapping[str, Mapping[str, float]] | None = None,
             epsilon: Mapping[str, float | None] | None = None,
             extra_metrics: Mapping[str, float] | None = None,
             trained: Mapping[int, Sequence[str]] | None = None) -> int:
    """Record a completed run with metrics per round and a checkpoint after every round.

    Args:
        engine: The coordinator database.
        home: The coordinator home (checkpoints go under it).
        project: Project name (created if new).
        task: Task name of the run.
        arrays: The model's arrays (default: the trained breast-cancer MLP).
        rounds: Rounds of the run.
        sites: The run's sites (each takes part in every round unless ``trained`` says
            otherwise).
        budget: The run's epsilon budget per site.
        final: Site -> {"auc", "accuracy"} of the final evaluation (default: the real ones).
        epsilon: Site -> the epsilon it reports after the last round (None: never reports).
        extra_metrics: More metrics every site reports in round 1.
        trained: Round -> the sites whose update was aggregated in it (default: every
            site); the others are recorded as failed in that round and report nothing.

    Returns:
        The run id.
    """
    arrays = dict(arrays if arrays is not None else trained_arrays())
    if final is None:
        final = real_metrics(arrays, sites) if task == "breast_cancer_mlp" else {
            s: {"auc": 0.95, "accuracy": 0.9} for s in sites}
    with session_scope(engine) as session:
        row = session.exec(select(Project).where(Project.name == project)).first()
        if row is None:
            row = Project(name=project)
            session.add(row)
            session.flush()
        assert row.id is not None
        config = RunConfig(rounds=rounds, local_epochs=3, epsilon=budget, delta=1e-5,
                           min_sites=len(sites), round_deadline_s=60.0, lr=1.0, batch_size=32,
                           max_grad_norm=1.0, seed=7, sites=list(sites))
        run = Run(project_id=row.id, task=task, config_json=config.model_dump_json(),
                  launched_by="seed")
        session.add(run)
        session.flush()
        assert run.id is not None
        run_id = run.id
    mark_run_started(engine, run_id, "4242")
    for n in range(1, rounds + 1):
        start_round(engine, run_id, n)
        in_round = list(sites) if trained is None else list(trained.get(n, sites))
        for i, site in enumerate(sites):
            if site not in in_round:
                continue
            last_eps = (epsilon or {}).get(site, budget * 0.9)
            metrics = {"eval-auc": 0.6 + 0.1 * n + 0.01 * i, "eval-accuracy": 0.55 + 0.1 * n,
                       "eval-loss": 0.8 - 0.1 * n, "num-eval-examples": 60.0,
                       "train-loss": 0.75 - 0.12 * n - 0.02 * i, "num-examples": 200.0}
            if last_eps is not None:
                metrics["epsilon-spent"] = last_eps * n / rounds
            if n == 1 and extra_metrics:
                metrics.update(extra_metrics)
            record_site_metrics(engine, run_id, n, site, metrics)
        finish_round(engine, run_id, n, status="completed", participating=in_round,
                     failed=[{"site": s, "phase": "train", "reason": "offline"}
                             for s in sites if s not in in_round], late=[], seconds=1.0)
        rel, sha = save_checkpoint(home, run_id, n, arrays)
        record_checkpoint(engine, run_id, n, str(rel), sha)
    for site in sites:
        figures = final.get(site)
        if figures:
            record_site_metrics(engine, run_id, rounds, site, {
                **{f"final-eval-{k}": v for k, v in figures.items()},
                "final-eval-loss": 0.3, "final-num-eval-examples": 60.0})
    finish_run(engine, run_id, status="completed", reason=None)
    return run_id


# --- users and the API ---------------------------------------------------------------------


Headers = dict[str, str]


def make_user(engine: Engine, role: str, name: str | None = None,
              password: str | None = PASSWORD) -> Headers:
    """Create a user (with a password); return its API token header."""
    with session_scope(engine) as session:
        _, token = create_user(session, name=name or role.replace("_", "-"), role=role,
                               password=password)
    return {"Authorization": f"Bearer {token}"}


def propose(client: TestClient, headers: Headers, run_id: int, **extra: Any) -> dict[str, Any]:
    r = client.post(api("/candidates"), json={"run_id": run_id, "intended_use": INTENDED_USE,
                                              **extra}, headers=headers)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def audit_actions(engine: Engine) -> list[str]:
    with session_scope(engine) as session:
        return [e.action for e in session.exec(select(AuditEvent).order_by(col(AuditEvent.id)))]

