"""Register an approved release in the MLflow model registry (see :mod:`mlflow_export`).

A release becomes one version of the project's registered model. Its files are logged to
the release's MLflow run under ``fedward/releases/<release id>/`` and the version's source
points there (MLflow 3's ``register_model`` refuses a folder of plain files, so the version
is created with ``create_model_version``). What ``models:/<name>@<alias>`` downloads:

- ``bundle/``: the signed bundle exactly as the coordinator verified it (ONNX, INT8 ONNX,
  OpenVINO, model card, training curve, ``model.sig``): ``fedward-verify bundle
  --public-key release-key.pub.pem`` checks it.
- ``lineage.json``: the lineage from the signed model card.
- ``release-key.pub.pem``: the release public key (compare its fingerprint, tag
  ``fedward.key_fingerprint``, through a second channel).

The alias always names the newest approved release that is not revoked: a revoked release's
version is tagged ``fedward.revoked`` and loses the alias.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine
from sqlmodel import select

from coordinator.db import session_scope
from coordinator.mlflow_export import (
    RELEASES_ARTIFACT_DIR,
    HandoffError,
    HandoffRefused,
    Target,
    coordinator_id,
    export_run,
    mlflow_errors,
    tracking_client,
)
from coordinator.mlflow_names import (
    TAG_APPROVED_AT,
    TAG_COORDINATOR,
    TAG_PROJECT,
    TAG_RELEASE,
    TAG_REVOKED,
    TAG_RUN,
    project_name,
)
from coordinator.models import Project, Release, ReleaseCandidate, Run
from coordinator.release_errors import ReleaseError
from coordinator.release_store import release_public_key, verified_bundle
from export.bundle_format import SIGNATURE_FILE

__all__ = ["LINEAGE_FILE", "PUBLIC_KEY_FILE", "register_release"]

LINEAGE_FILE: Final = "lineage.json"
PUBLIC_KEY_FILE: Final = "release-key.pub.pem"


@dataclass(frozen=True)
class _ReleaseRecord:
    release: Release
    run_id: int
    round_number: int
    project: str
    task: str
    approved_at: str
    approved_by: str


def _stamp(when: datetime | None) -> str:
    # One fixed format, so that the tags of two versions compare in time order as text.
    return "" if when is None else when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _read_release(engine: Engine, release_id: str) -> _ReleaseRecord:
    with session_scope(engine) as session:
        release = session.exec(select(Release).where(Release.release_id == release_id)).first()
        if release is None:
            raise HandoffRefused(f"release {release_id!r} not found")
        cand = session.get(ReleaseCandidate, release.candidate_id)
        assert cand is not None  # foreign key
        run = session.get(Run, cand.run_id)
        assert run is not None
        project = session.get(Project, run.project_id)
        assert project is not None
        return _ReleaseRecord(release=release, run_id=cand.run_id,
                              round_number=cand.round_number, project=project.name,
                              task=run.task, approved_at=_stamp(cand.decided_at),
                              approved_by=cand.decided_by or release.created_by)


def register_release(engine: Engine, *, home: Path, release_id: str,
                     target: Target) -> dict[str, Any]:
    """Register an approved release as a model version and point the alias at the newest.

    A release registered before is found by its tags and not registered again. A revoked
    release is not registered; if it was, its version is tagged ``fedward.revoked`` and the
    alias moves to the newest approved release that is not revoked (or is removed).

    Args:
        engine: Coordinator database engine.
        home: The coordinator's data directory (bundles, release key, coordinator id).
        release_id: The release.
        target: The tracking server and names.

    Returns:
        ``tracking_uri``, ``model_name``, ``version`` (``None`` when a revoked release was
        never registered), ``alias``, ``alias_version`` (the version the alias names now),
        ``model_uri``, ``revoked`` and, for a version, ``mlflow_run_id`` and ``model_url``.

    Raises:
        HandoffRefused: No such release, or its stored bundle fails verification.
        HandoffError: The server is unreachable or refused a call (retry later).
    """
    rec = _read_release(engine, release_id)
    cid = coordinator_id(home)
    uri = target.tracking_uri
    name = project_name(target.model_name, rec.project)
    client = tracking_client(uri)
    result: dict[str, Any] = {"tracking_uri": uri, "model_name": name, "alias": target.alias,
                              "model_uri": f"models:/{name}@{target.alias}",
                              "revoked": rec.release.revoked_at is not None}
    try:
        version = _our_version(client, name, cid, release_id)
        if rec.release.revoked_at is not None:
            if version is not None:
                client.set_model_version_tag(name, version.version, TAG_REVOKED,
                                             (rec.release.revoke_reason or "revoked")[:4000])
        elif version is None:
            version = _create_version(client, engine, home=home, rec=rec, cid=cid,
                                      name=name, target=target)
        result["alias_version"] = _point_alias(client, name, target.alias)
    except HandoffError:
        raise
    except mlflow_errors() as err:
        raise HandoffError(f"MLflow at {uri} failed to register release {release_id}: "
                           f"{str(err)[:500]}") from None
    if version is not None:
        result.update(version=str(version.version), mlflow_run_id=version.run_id,
                      model_url=f"{uri}/#/models/{name}/versions/{version.version}")
    else:
        result["version"] = None
    return result


def _our_version(client: Any, name: str, cid: str, release_id: str) -> Any:
    """The version this coordinator registered for ``release_id``, or ``None``."""
    found = client.search_model_versions(
        f"name = '{name}' and tags.`{TAG_RELEASE}` = '{release_id}'")
    ours = [v for v in found if v.tags.get(TAG_COORDINATOR) == cid]
    return min(ours, key=lambda v: int(v.version)) if ours else None


def _create_version(client: Any, engine: Engine, *, home: Path, rec: _ReleaseRecord,
                    cid: str, name: str, target: Target) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        verified = verified_bundle(home, rec.release)
    except ReleaseError as err:
        raise HandoffRefused(f"release {rec.release.release_id} is not handed to MLflow: "
                             f"{err}") from None
    key = release_public_key(home)
    if key is None:
        raise HandoffRefused("the release public key is missing")
    ml_run_id = export_run(engine, home=home, run_id=rec.run_id, target=target)["mlflow_run_id"]
    artifact_path = f"{RELEASES_ARTIFACT_DIR}/{rec.release.release_id}"
    with tempfile.TemporaryDirectory(prefix="fedward-mlflow-") as tmp:
        stage = Path(tmp)
        (stage / "bundle").mkdir()
        # The bytes uploaded are the bytes whose digests were just verified.
        for file_name in verified.files:
            (stage / "bundle" / file_name).write_bytes(verified.read_verified(file_name))
        (stage / "bundle" / SIGNATURE_FILE).write_bytes(
            (verified.path / SIGNATURE_FILE).read_bytes())
        (stage / LINEAGE_FILE).write_text(json.dumps(
            verified.model_card.get("lineage", {}), indent=2, sort_keys=True) + "\n")
        (stage / PUBLIC_KEY_FILE).write_bytes(key[0])
        client.log_artifacts(ml_run_id, str(stage), artifact_path)
    try:
        client.create_registered_model(name, tags={TAG_PROJECT: rec.project}, description=(
            f"Approved Fedward releases of project {rec.project}. The alias "
            f"@{target.alias} names the newest approved release that is not revoked."))
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    software = verified.model_card.get("lineage", {}).get("software", {})
    artifact_uri = client.get_run(ml_run_id).info.artifact_uri
    return client.create_model_version(
        name, source=f"{artifact_uri}/{artifact_path}", run_id=ml_run_id,
        description=str(verified.model_card.get("intended_use", ""))[:4000],
        tags={TAG_RELEASE: rec.release.release_id, TAG_COORDINATOR: cid,
              TAG_RUN: str(rec.run_id), TAG_PROJECT: rec.project, "fedward.task": rec.task,
              "fedward.round": str(rec.round_number), TAG_APPROVED_AT: rec.approved_at,
              "fedward.approved_by": rec.approved_by,
              "fedward.key_fingerprint": verified.key_fingerprint,
              "fedward.code_revision": str(software.get("code_revision", "unknown"))})


def _point_alias(client: Any, name: str, alias: str) -> str | None:
    """Point ``alias`` at the newest approved release's version that is not revoked.

    Returns:
        The version the alias names now, or ``None`` (no such version: alias removed).
    """
    from mlflow.exceptions import MlflowException

    ours = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")
            if TAG_RELEASE in v.tags}
    best = max((v for v in ours.values() if TAG_REVOKED not in v.tags),
               key=lambda v: (v.tags.get(TAG_APPROVED_AT, ""), int(v.version)), default=None)
    try:
        current = client.get_model_version_by_alias(name, alias).version
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        current = None
    if best is None:
        if current is not None and str(current) in ours:  # never touch someone else's alias
            client.delete_registered_model_alias(name, alias)
        return None
    if str(current) != str(best.version):
        client.set_registered_model_alias(name, alias, best.version)
    return str(best.version)
