"""Hand a run, or an approved release, to an MLflow tracking server.

One MLflow run per Fedward run, in the project's experiment: the run configuration as
parameters, every metric each site reported as ``site.<site>.<metric>`` with step = round
(``epsilon-spent`` among them), each round's duration and site counts as ``round.*``, and
tags that link back (coordinator, run, project, task, status, code revision). An approved
release becomes a version of the project's registered model whose files are the signed
bundle exactly as verified here (``bundle/``), its lineage (``lineage.json``) and the release
public key; the configured alias points at the newest approved release not revoked.

Repeatable: the run is found again by its tags and updated (metric points already there
are not logged twice), and a release already registered is not registered again.

Only this module imports MLflow, and only when an export runs. Telemetry is switched off
before that import: the appliance is offline and must not try to phone home.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx
from sqlalchemy import Engine
from sqlmodel import col, select

from coordinator.db import session_scope
from coordinator.mlflow_names import (
    TAG_COORDINATOR,
    TAG_PROJECT,
    TAG_RUN,
    metric_key,
    project_name,
)
from coordinator.models import Project, Round, Run, SiteMetric
from fedward import code_revision

# Before any import of MLflow (see the module docstring); fewer, shorter HTTP retries than
# MLflow's defaults (7 retries, about two minutes) so a dead server fails an export quickly.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
# The client would print a "View run" link on stdout after each run it ends.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

__all__ = [
    "HandoffError",
    "HandoffRefused",
    "Target",
    "TrackingServerUnreachable",
    "coordinator_id",
    "export_run",
    "mlflow_errors",
    "tracking_client",
]

COORDINATOR_ID_FILE: Final = "coordinator.id"
RELEASES_ARTIFACT_DIR: Final = "fedward/releases"
_RUN_STATUS: Final = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED",
                      "cancelled": "KILLED"}
_PROBE_TIMEOUT_S: Final = 5.0


class HandoffError(RuntimeError):
    """An export failed in a way a later retry may cure (the server, the network)."""


class TrackingServerUnreachable(HandoffError):
    """Nothing answers at the tracking URI."""


class HandoffRefused(RuntimeError):
    """An export that no retry can do (no such run or release, a bundle that fails
    verification); the message says why."""


@dataclass(frozen=True)
class Target:
    """Where and under which names to export.

    Attributes:
        tracking_uri: ``http(s)://host:port`` of the tracking server.
        experiment: Experiment name template (``{project}``).
        model_name: Registered model name template (``{project}``).
        alias: Alias of the newest approved, unrevoked release's version.
    """

    tracking_uri: str
    experiment: str
    model_name: str
    alias: str


def coordinator_id(home: Path) -> str:
    """This coordinator's id (made once, kept in ``home/coordinator.id``).

    It tells apart the runs of two coordinators that export into one MLflow (both have a
    run 1).
    """
    path = home / COORDINATOR_ID_FILE
    if not path.exists():
        # Written aside, then linked into place: a reader never sees a half-written id, and
        # of two first writers one wins (link refuses an existing name).
        tmp = home / f".{COORDINATOR_ID_FILE}.{uuid.uuid4().hex}"
        tmp.write_text(uuid.uuid4().hex + "\n", encoding="ascii")
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text(encoding="ascii").strip()


def tracking_client(uri: str) -> Any:
    """An MLflow client for ``uri``, after checking that something answers there.

    Raises:
        TrackingServerUnreachable: Nothing answers (the message names the URI and what to do).
    """
    try:
        httpx.get(f"{uri}/health", timeout=_PROBE_TIMEOUT_S)
    except httpx.HTTPError as err:
        raise TrackingServerUnreachable(
            f"the MLflow tracking server at {uri} is not reachable ({type(err).__name__}: "
            f"{err}); start it or correct the URI (FEDWARD_MLFLOW_TRACKING_URI, or "
            "--tracking-uri); the export is kept and retried (`fedward-coordinator mlflow "
            "status` shows it)") from None
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _ms(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp() * 1000)


def mlflow_errors() -> tuple[type[BaseException], ...]:
    """The exceptions an MLflow client call raises when the server or network fails it."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.RequestException, OSError)


# --- runs ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunRecord:
    run: Run
    project: str
    rounds: list[Round]
    metrics: list[SiteMetric]


def _read_run(engine: Engine, run_id: int) -> _RunRecord:
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        if run is None:
            raise HandoffRefused(f"run {run_id} not found")
        project = session.get(Project, run.project_id)
        assert project is not None  # foreign key
        rounds = list(session.exec(select(Round).where(Round.run_id == run_id)
                                   .order_by(col(Round.number))).all())
        metrics = list(session.exec(select(SiteMetric).where(SiteMetric.run_id == run_id)
                                    .order_by(col(SiteMetric.id))).all())
        return _RunRecord(run=run, project=project.name, rounds=rounds, metrics=metrics)


def _params(rec: _RunRecord) -> dict[str, str]:
    config: dict[str, Any] = json.loads(rec.run.config_json)
    out = {"project": rec.project, "task": rec.run.task, "launched_by": rec.run.launched_by}
    for key, value in sorted(config.items()):
        if key == "sites" and isinstance(value, list):
            out["sites"] = ",".join(str(s) for s in value)
            out["num_sites"] = str(len(value))
        elif isinstance(value, dict | list):
            out[key] = json.dumps(value, sort_keys=True)
        else:
            out[key] = "none" if value is None else str(value)
    # MLflow keeps at most 6000 characters of a parameter's value.
    return {k: v if len(v) <= 6000 else v[:5990] + "...(cut)" for k, v in out.items()}


def _tags(rec: _RunRecord, cid: str) -> dict[str, str]:
    run = rec.run
    tags = {TAG_COORDINATOR: cid, TAG_RUN: str(run.id), TAG_PROJECT: rec.project,
            "fedward.task": run.task, "fedward.status": run.status,
            "fedward.launched_by": run.launched_by,
            "fedward.code_revision": code_revision(),
            "mlflow.source.name": "fedward-coordinator"}
    if run.flwr_run_id:
        tags["fedward.flower_run_id"] = run.flwr_run_id
    if run.failure_reason:
        tags["fedward.failure_reason"] = run.failure_reason[:7900]
    return tags


def _points(rec: _RunRecord) -> list[tuple[str, float, int, int]]:
    """Every metric point as (key, value, timestamp ms, step = round)."""
    fallback = _ms(rec.run.finished_at or rec.run.started_at or rec.run.created_at) or 0
    when = {r.number: _ms(r.finished_at or r.started_at) or fallback for r in rec.rounds}
    out = [(metric_key("site", m.site_name, m.name), float(m.value),
            when.get(m.round_number, fallback), m.round_number) for m in rec.metrics]
    for r in rec.rounds:
        counts = {"participating_sites": r.participating_sites_json,
                  "failed_sites": r.failed_sites_json, "late_sites": r.late_sites_json}
        for name, raw in counts.items():
            out.append((metric_key("round", name), float(len(json.loads(raw))), when[r.number],
                        r.number))
        if r.seconds is not None:
            out.append((metric_key("round", "seconds"), float(r.seconds), when[r.number],
                        r.number))
    return out


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return str(client.create_experiment(name, tags={"mlflow.note.content": (
                "Runs handed off by Fedward coordinators: one MLflow run per Fedward run.")}))
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)  # made meanwhile by another export
    if found.lifecycle_stage == "deleted":
        raise HandoffError(f"the MLflow experiment {name!r} was deleted; restore it "
                           "(`mlflow experiments restore`) or configure another name "
                           "(FEDWARD_MLFLOW_EXPERIMENT)")
    return str(found.experiment_id)


def _batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def export_run(engine: Engine, *, home: Path, run_id: int, target: Target) -> dict[str, Any]:
    """Create or update the MLflow run of a Fedward run.

    Args:
        engine: Coordinator database engine.
        home: The coordinator's data directory (for its id).
        run_id: The Fedward run.
        target: The tracking server and names.

    Returns:
        ``tracking_uri``, ``experiment``, ``experiment_id``, ``mlflow_run_id``, ``run_url``
        and how many metric points were logged now (``points_logged``).

    Raises:
        HandoffRefused: No such run.
        HandoffError: The server is unreachable or refused a call (retry later).
    """
    rec = _read_run(engine, run_id)
    cid = coordinator_id(home)
    uri = target.tracking_uri
    client = tracking_client(uri)
    try:
        return _export_run(client, rec, cid, target)
    except HandoffError:
        raise
    except mlflow_errors() as err:
        raise HandoffError(f"MLflow at {uri} failed the export of run {run_id}: "
                           f"{str(err)[:500]}") from None


def _export_run(client: Any, rec: _RunRecord, cid: str, target: Target) -> dict[str, Any]:
    from mlflow.entities import Metric, Param, RunTag

    run = rec.run
    experiment = project_name(target.experiment, rec.project)
    exp_id = _experiment_id(client, experiment)
    found = client.search_runs(
        [exp_id], filter_string=f"tags.`{TAG_COORDINATOR}` = '{cid}' and "
                                f"tags.`{TAG_RUN}` = '{run.id}'", max_results=1)
    tags = _tags(rec, cid)
    if found:
        ml_run = found[0]
    else:
        ml_run = client.create_run(exp_id, start_time=_ms(run.started_at or run.created_at),
                                   tags=tags, run_name=f"{rec.project}-run-{run.id}")
    ml_id = ml_run.info.run_id
    have_params = ml_run.data.params if found else {}
    # MLflow refuses to change a parameter: log only those not there yet.
    params = [Param(k, v) for k, v in _params(rec).items() if k not in have_params]
    points = _points(rec)
    logged: dict[str, set[tuple[int, float]]] = {}
    if found:
        for key in sorted({p[0] for p in points}):
            logged[key] = {(m.step, m.value) for m in client.get_metric_history(ml_id, key)}
    new = [Metric(k, v, ts, step) for k, v, ts, step in points
           if (step, v) not in logged.get(k, set())]
    for chunk in _batches(params, 100):
        client.log_batch(ml_id, params=chunk)
    client.log_batch(ml_id, tags=[RunTag(k, v) for k, v in tags.items()])
    for chunk in _batches(new, 1000):
        client.log_batch(ml_id, metrics=chunk)
    client.log_dict(ml_id, {"fedward_run_id": run.id, "project": rec.project,
                            "task": run.task, "status": run.status,
                            "config": json.loads(run.config_json),
                            "rounds": [{"round": r.number, "status": r.status,
                                        "seconds": r.seconds,
                                        "participating": json.loads(r.participating_sites_json),
                                        "failed": json.loads(r.failed_sites_json),
                                        "late": json.loads(r.late_sites_json)}
                                       for r in rec.rounds]}, "fedward/run.json")
    status = _RUN_STATUS.get(run.status)
    if status is None:
        client.update_run(ml_id, status="RUNNING")
    else:
        client.set_terminated(ml_id, status=status,
                              end_time=_ms(run.finished_at or run.started_at))
    uri = target.tracking_uri
    return {"tracking_uri": uri, "experiment": experiment, "experiment_id": exp_id,
            "mlflow_run_id": ml_id, "run_url": f"{uri}/#/experiments/{exp_id}/runs/{ml_id}",
            "points_logged": len(new)}
