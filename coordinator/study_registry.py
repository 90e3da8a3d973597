"""The coordinator's study registry: study specs by name, version and content hash.

Registering a spec validates it (:func:`fedward.study.parse_spec`, every problem at once,
DP-SGD trainability included) and stores its canonical JSON. Registering content that is
already there is idempotent (the same version comes back); a changed spec under a name gets
that name's next version. A version's spec is never changed and no version is deleted: a
run pins one by its hash. A version may be retired (:func:`retire_study`, who, when and why
kept on its row and in the audit log): it stays listed, and a new run naming it is refused
(:class:`coordinator.study_retirement.StudyRetiredError`, with what to launch instead).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from coordinator.audit import append_event
from coordinator.models import Run, RunStatistics, Study, utcnow
from coordinator.study_retirement import (
    StudyAlreadyRetiredError,
    StudyRetiredError,
    retired_note,
    retired_refusal,
)
from fedward.plugins import PluginError, PluginPin, model_plugin_pin
from fedward.preprocessing import Preprocessing, compose
from fedward.run_config import RunPlan, RunRequest
from fedward.study import StudySpec, parse_spec, parse_study_ref
from fedward.tasks import TaskSpec, UntrainableStudyError, get_task, study_task

__all__ = [
    "Registered",
    "StudyNotFoundError",
    "StudyNotTrainableError",
    "get_study",
    "list_studies",
    "newest_in_use",
    "plan_task",
    "register_study",
    "retire_study",
    "retired_view",
    "run_preprocessing",
    "run_task",
    "spec_of",
    "study_public",
    "study_run_settings",
    "trainable_task",
]


class StudyNotFoundError(LookupError):
    """No study of that name, or not that version; the message lists what there is."""


class StudyNotTrainableError(ValueError):
    """A registered study that the sites of this release cannot train yet."""


@dataclass(frozen=True)
class Registered:
    """The outcome of :func:`register_study`.

    Attributes:
        study: the stored version.
        created: False when identical content was registered already (idempotent).
    """

    study: Study
    created: bool


def register_study(session: Session, spec: StudySpec, *, actor: str) -> Registered:
    """Store ``spec`` as its name's next version, or return the version that holds it.

    Commits. Two coordinators' workers registering at once: the unique constraints keep
    versions distinct; the loser sees the winner's row and answers from it.
    """
    digest = spec.content_hash()
    for _attempt in range(3):
        existing = session.exec(select(Study).where(Study.name == spec.name,
                                                    Study.content_hash == digest)).first()
        if existing is not None:
            return Registered(existing, created=False)
        newest = session.exec(select(func.max(Study.version))
                              .where(Study.name == spec.name)).one()
        study = Study(name=spec.name, version=int(newest or 0) + 1, content_hash=digest,
                      spec_json=spec.canonical().decode("utf-8"), registered_by=actor)
        session.add(study)
        try:
            session.flush()
            append_event(session, actor=actor, action="study.registered",
                         subject=f"study:{spec.name}@{study.version}",
                         detail={"name": spec.name, "version": study.version,
                                 "hash": digest, "features": len(spec.features),
                                 "model": spec.model.family,
                                 **({"plugin": spec.model.name}
                                    if spec.model.family == "plugin" else {})})
            session.commit()
        except IntegrityError:
            session.rollback()
            continue
        session.refresh(study)
        return Registered(study, created=True)
    raise RuntimeError(f"could not register study {spec.name!r}: concurrent registrations "
                       "kept taking its next version; try again")


def list_studies(session: Session) -> list[Study]:
    """Every version of every study, by name then version."""
    return list(session.exec(select(Study).order_by(col(Study.name), col(Study.version))))


def get_study(session: Session, ref: str) -> Study:
    """The study ``NAME@VERSION``, or the newest version of ``NAME``.

    Raises:
        ValueError: ``ref`` is not a reference.
        StudyNotFoundError: naming the registered versions (or studies).
    """
    name, version = parse_study_ref(ref)
    query = select(Study).where(Study.name == name)
    rows = list(session.exec(query.order_by(col(Study.version))))
    if not rows:
        names = sorted({s.name for s in session.exec(select(Study))})
        raise StudyNotFoundError(
            f"no study named {name!r} is registered (registered: {', '.join(names) or 'none'}"
            "); register it with `fedward-coordinator study register FILE`")
    if version is None:
        return rows[-1]
    for row in rows:
        if row.version == version:
            return row
    raise StudyNotFoundError(
        f"study {name!r} has no version {version} (versions: "
        f"{', '.join(str(r.version) for r in rows)})")


def newest_in_use(session: Session, name: str) -> Study | None:
    """The newest version of study ``name`` that is not retired (None: every one is)."""
    return session.exec(select(Study).where(Study.name == name,
                                            col(Study.retired_at).is_(None))
                        .order_by(col(Study.version).desc())).first()


def retired_view(session: Session, study: Study) -> dict[str, Any] | None:
    """A version's public ``retired`` view: ``by``, ``at``, ``reason`` and ``instead`` (the
    newest version of the same study in use, or None); None when it is not retired."""
    if study.retired_at is None:
        return None
    instead = newest_in_use(session, study.name)
    return {"by": study.retired_by, "at": study.retired_at.isoformat(),
            "reason": study.retire_reason,
            "instead": None if instead is None else f"{instead.name}@{instead.version}"}


def retire_study(session: Session, study: Study, *, actor: str, reason: str) -> Study:
    """Retire one version: record who, when and why on its row and in the audit log
    (``study.retired``), and commit. Its spec, its runs and their releases stay as they are.

    Args:
        session: the database session.
        study: the version (resolved from an explicit ``NAME@VERSION``).
        actor: who retires it.
        reason: why (non-empty).

    Raises:
        StudyAlreadyRetiredError: it was retired before (that retirement stands).
    """
    # Locked while checked and written: of two retirements at once, the second sees the first
    # (PostgreSQL: the row lock; SQLite: the write transaction every session begins with).
    row = session.exec(select(Study).where(Study.id == study.id).with_for_update()
                       .execution_options(populate_existing=True)).one()
    ref = f"{row.name}@{row.version}"
    if row.retired_at is not None:
        view = retired_view(session, row)
        assert view is not None
        session.rollback()
        raise StudyAlreadyRetiredError(f"study {ref} was already {retired_note(view)}; "
                                       "nothing changed")
    row.retired_at, row.retired_by, row.retire_reason = utcnow(), actor, reason
    session.add(row)
    append_event(session, actor=actor, action="study.retired", subject=f"study:{ref}",
                 detail={"name": row.name, "version": row.version, "hash": row.content_hash,
                         "reason": reason})
    session.commit()
    session.refresh(row)
    return row


def spec_of(study: Study) -> StudySpec:
    """The stored spec, validated again (without the DP check: it passed at registration)."""
    return parse_spec(json.loads(study.spec_json), source=f"study {study.name}@{study.version}",
                      check_dp=False)


def trainable_task(study: Study) -> str:
    """The task name a run of ``study`` trains (the study's name).

    Any study trains, whose model is a built-in family or an installed plugin: the
    ServerApp builds the initial model from the registered spec, and each site from its own
    approved copy of the spec (same content hash), :func:`fedward.tasks.study_task`.

    Raises:
        StudyNotTrainableError: a shipped task's name with another model.
    """
    try:
        return study_task(spec_of(study)).name
    except UntrainableStudyError as err:
        raise StudyNotTrainableError(f"study {study.name}@{study.version}: {err}") from None


def _task_by_hash(session: Session, name: str, study_hash: str | None) -> TaskSpec:
    if study_hash is None:
        return get_task(name)
    study = session.exec(select(Study).where(Study.content_hash == study_hash)).first()
    if study is None:
        raise StudyNotFoundError(f"the study with hash {study_hash} that run pins is not "
                                 "registered at this coordinator")
    return study_task(spec_of(study))


def run_study_bytes(session: Session, run: Run) -> bytes | None:
    """The canonical spec of the study a stored run pins (whose SHA-256 is the pinned
    hash), or None for a run of a registry task."""
    study_hash = json.loads(run.config_json).get("study_hash")
    if study_hash is None:
        return None
    study = session.exec(select(Study).where(Study.content_hash == study_hash)).first()
    if study is None:
        raise StudyNotFoundError(f"the study with hash {study_hash} that run pins is not "
                                 "registered at this coordinator")
    return spec_of(study).canonical()


def run_task(session: Session, run: Run) -> TaskSpec:
    """The task a stored run trains: its pinned study's (by hash, with the run's imputation
    and scaling when it had a statistics phase), else the registry task.

    Args:
        session: the database session.
        run: the run (its ``task`` and ``config_json``).
    """
    config = json.loads(run.config_json)
    study_hash = config.get("study_hash")
    task = _task_by_hash(session, str(run.task), study_hash)
    if study_hash is None or run.id is None:
        return task
    # A run of a study with a statistics phase: the model imputes and scales as it was
    # trained to.
    pre = run_preprocessing(session, run_id=run.id, study_hash=study_hash)
    if pre is None:
        return task
    study = session.exec(select(Study).where(Study.content_hash == study_hash)).first()
    assert study is not None  # _task_by_hash found it
    return study_task(spec_of(study), pre)


def run_preprocessing(session: Session, *, run_id: int, study_hash: str | None
                      ) -> Preprocessing | None:
    """The imputation and scaling of a run of a study, composed from its stored DP
    statistics (:func:`fedward.preprocessing.compose`); None for a run without a study or
    without statistics (yet). The same function of the same stored numbers wherever it is
    asked (the round loop, an evaluation, a release), so they all agree.
    """
    if study_hash is None:
        return None
    row = session.exec(select(RunStatistics).where(RunStatistics.run_id == run_id)).first()
    study = session.exec(select(Study).where(Study.content_hash == study_hash)).first()
    if row is None or study is None:
        return None
    return compose(spec_of(study), json.loads(row.reference_json))


def plan_task(engine: Engine, plan: RunPlan) -> TaskSpec:
    """The task the ServerApp trains for ``plan`` (see :func:`run_task`).

    Raises:
        PluginError: the run pins a model plugin that is no longer installed here as it
            was when the run was launched.
    """
    with Session(engine) as session:
        task = _task_by_hash(session, plan.task, plan.study_hash)
    pinned = PluginPin.from_config(plan.model_dump())
    if pinned is not None:
        have = model_plugin_pin(task.model)
        if not have.same(pinned):
            raise PluginError(f"run {plan.run_id} pins the model plugin {pinned} but this "
                              f"coordinator now has {have}; launch the run again")
    return task


def study_public(study: Study, *, with_spec: bool = False,
                 retired: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON view of a version (``GET /studies``, ``study show``); ``retired`` is its
    :func:`retired_view` (None: in use)."""
    spec = json.loads(study.spec_json)
    out: dict[str, Any] = {
        "name": study.name, "version": study.version, "ref": f"{study.name}@{study.version}",
        "hash": study.content_hash, "registered_by": study.registered_by,
        "created_at": study.created_at.isoformat(),
        "n_features": len(spec.get("features", [])),
        "label": spec.get("label", {}).get("name"),
        "classes": spec.get("label", {}).get("classes"),
        "model": spec.get("model", {}).get("family"),
        "retired": retired,
    }
    if out["model"] == "plugin":
        out["plugin"] = spec.get("model", {}).get("name")
    if with_spec:
        out["spec"] = spec
    return out


def study_run_settings(session: Session, request: RunRequest,
                       refuse: Callable[[str, str], NoReturn]) -> tuple[str, dict[str, Any]]:
    """The task of a run request and what its study adds to the run's settings.

    For a request that names a ``task``: that task and nothing more. For one that names a
    ``study``: the task it trains (:func:`trainable_task`), the study's ``NAME@VERSION`` and
    content hash, and its training defaults for every setting the request left out
    (``lr`` and ``batch_size`` come through the task's defaults, which are the study's).

    Args:
        session: the database session.
        request: the run request.
        refuse: called with (field, message) to refuse the request; does not return.

    Raises:
        StudyRetiredError: the version named (or ``NAME``'s newest) is retired.
    """
    if request.study is None:
        assert request.task is not None
        return request.task, {}
    try:
        study = get_study(session, request.study)
    except (StudyNotFoundError, ValueError) as err:
        refuse("study", str(err))
    retired = retired_view(session, study)
    if retired is not None:  # before trainability: retired is the answer that stands
        raise StudyRetiredError(retired_refusal(f"{study.name}@{study.version}", retired))
    try:
        task = trainable_task(study)
    except ValueError as err:  # StudyNotTrainableError, or a stored spec that fails now
        refuse("study", str(err))
    spec = spec_of(study)
    out: dict[str, Any] = {"study": f"{study.name}@{study.version}",
                           "study_hash": study.content_hash}
    if spec.model.family == "plugin":
        assert spec.model.name is not None
        try:  # the run pins the plugin as installed here now; every site must match it
            out.update(model_plugin_pin(spec.model.name).to_config())
        except PluginError as err:
            refuse("study", f"study {study.name}@{study.version}: {err}")
    given = request.model_fields_set
    for name in ("lr", "batch_size", "local_epochs", "max_grad_norm"):
        if name not in given or getattr(request, name) is None:
            out[name] = getattr(spec.training, name)
    return task, out
