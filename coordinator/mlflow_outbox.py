"""The MLflow hand-off's outbox: exports to do, done or failed, and the worker that does them.

When a tracking server is configured (``FEDWARD_MLFLOW_TRACKING_URI``), completing a run
(:func:`note_run_finished`, in the ServerApp's process) and approving a release
(:func:`note_release_approved`, in the API's) add a row to ``mlflow_exports`` in the same
transaction, so the hand-off can never be lost, and never waits for MLflow: the run and the
approval finish at once. A background :class:`ExportWorker` in the coordinator's API process
does the exports, at start-up and then every ``mlflow_retry_s``; one that fails stays
pending with its error and is retried with a doubling delay (at most 15 minutes). An export
that no retry can do (a bundle that fails verification) is marked ``failed`` with the reason;
asking for it again re-arms it. Revoking a release that was registered re-arms its export,
which then moves the alias away from it.

Nothing here imports MLflow: the exports themselves are in :mod:`coordinator.mlflow_export`
and :mod:`coordinator.mlflow_registry`, imported when the first export runs.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Engine, event
from sqlmodel import Session, col, select

from coordinator.audit import append_event
from coordinator.db import session_scope
from coordinator.models import MlflowExport, Release, Run, utcnow
from coordinator.settings import Settings

__all__ = [
    "AUTO_REQUESTER",
    "KIND_RELEASE",
    "KIND_RUN",
    "ExportWorker",
    "attempt_export",
    "note_release_approved",
    "note_run_finished",
    "request_export",
    "target_uri",
]

KIND_RUN: Final = "run"
KIND_RELEASE: Final = "release"
AUTO_REQUESTER: Final = "coordinator"
MAX_RETRY_DELAY_S: Final = 900.0
NOT_CONFIGURED: Final = ("waiting: no tracking server is configured (set "
                         "FEDWARD_MLFLOW_TRACKING_URI and restart the coordinator, or export "
                         "it with --tracking-uri)")

log = logging.getLogger(__name__)
# One export at a time in this process: the worker and an export asked for over the API
# must not both create the MLflow run of the same Fedward run.
_EXPORT_LOCK: Final = threading.Lock()
# The workers of this process: a commit that added a hand-off wakes them at once.
_WORKERS: Final[set[ExportWorker]] = set()


def _wake_workers(_session: Session) -> None:
    for worker in list(_WORKERS):
        worker.wake()


def request_export(session: Session, *, kind: str, subject: str, requested_by: str,
                   tracking_uri: str | None = None, wake: bool = True) -> MlflowExport:
    """Record that ``subject`` is to be exported now (re-arms a done or failed export).

    Args:
        session: Open session; the caller commits.
        kind: :data:`KIND_RUN` or :data:`KIND_RELEASE`.
        subject: The run id (as text) or the release id.
        requested_by: Who asked (a user name, or :data:`AUTO_REQUESTER`).
        tracking_uri: The server to export to; ``None``: the configured one.
        wake: Wake this process's worker when the session commits (``False`` when the
            caller does the export itself at once).

    Returns:
        The row (flushed: it has its id).
    """
    if kind not in (KIND_RUN, KIND_RELEASE):
        raise ValueError(f"unknown export kind {kind!r}")
    row = session.exec(select(MlflowExport).where(MlflowExport.kind == kind,
                                                  MlflowExport.subject == subject)).first()
    if row is None:
        row = MlflowExport(kind=kind, subject=subject, requested_by=requested_by)
    row.state, row.attempts, row.last_error = "pending", 0, None
    row.tracking_uri, row.requested_by = tracking_uri, requested_by
    row.requested_at = row.next_attempt_at = utcnow()
    session.add(row)
    session.flush()
    if wake:
        event.listen(session, "after_commit", _wake_workers, once=True)
    return row


# Set (to "1") in the ServerApp's environment when the coordinator hands completed runs to
# MLflow automatically.
MLFLOW_AUTO_ENV: Final = "FEDWARD_MLFLOW_AUTO"


def _note(session: Session, kind: str, subject: str) -> None:
    """Add an automatic hand-off if one is configured; never raise (see the module doc)."""
    try:
        # The ServerApp (which records a run's end) gets only MLFLOW_AUTO_ENV from the
        # coordinator: the tracking URI itself may hold a password.
        if Settings().mlflow_tracking_uri is None and os.environ.get(MLFLOW_AUTO_ENV) != "1":
            return
        with session.begin_nested():  # a failure here undoes only this row
            request_export(session, kind=kind, subject=subject, requested_by=AUTO_REQUESTER)
    except Exception:
        log.exception("could not record the MLflow hand-off of %s %s; export it by hand "
                      "(`fedward-coordinator mlflow export`)", kind, subject)


def note_run_finished(session: Session, run: Run) -> None:
    """Hook for a run's final status: a completed run is handed to MLflow (if configured)."""
    if run.status == "completed":
        _note(session, KIND_RUN, str(run.id))


def note_release_approved(session: Session, release: Release) -> None:
    """Hook for an approval: the new release is registered in MLflow (if configured)."""
    _note(session, KIND_RELEASE, release.release_id)


def target_uri(row: MlflowExport, settings: Settings) -> str | None:
    """The server an export goes to: the one it named, else the configured one."""
    return row.tracking_uri or settings.mlflow_tracking_uri


def attempt_export(engine: Engine, settings: Settings, export_id: int, *,
                   only_if_due: bool = False) -> dict[str, Any] | None:
    """Do one pending export now and record the outcome on its row.

    Args:
        engine: Coordinator database engine.
        settings: Coordinator settings (data directory, names, configured server).
        export_id: The row's id.
        only_if_due: Skip it unless it is still pending and due (the worker: an export
            asked for over the API may have been done meanwhile).

    Returns:
        Where the export went (see :func:`coordinator.mlflow_export.export_run` and
        :func:`coordinator.mlflow_registry.register_release`); ``None`` if skipped.

    Raises:
        HandoffError: It failed and stays pending (retried later).
        HandoffRefused: It cannot be done; the row is ``failed`` with the reason.
        LookupError: No such row, or no tracking server to send it to.
    """
    from coordinator.mlflow_export import HandoffError, HandoffRefused, Target, export_run
    from coordinator.mlflow_registry import register_release

    with _EXPORT_LOCK:
        with session_scope(engine) as session:
            row = session.get(MlflowExport, export_id)
            if row is None:
                raise LookupError(f"no MLflow export {export_id}")
            if only_if_due and (row.state != "pending" or (
                    row.next_attempt_at is not None and row.next_attempt_at > utcnow())):
                return None
            kind, subject, uri = row.kind, row.subject, target_uri(row, settings)
        if uri is None:
            raise LookupError(NOT_CONFIGURED)
        target = Target(tracking_uri=uri, experiment=settings.mlflow_experiment,
                        model_name=settings.mlflow_model_name, alias=settings.mlflow_alias)
        try:
            if kind == KIND_RUN:
                result = export_run(engine, home=settings.home, run_id=int(subject),
                                    target=target)
            else:
                result = register_release(engine, home=settings.home, release_id=subject,
                                          target=target)
        except HandoffRefused as err:
            _record(engine, export_id, state="failed", error=str(err), settings=settings)
            raise
        except HandoffError as err:
            _record(engine, export_id, state="pending", error=str(err), settings=settings)
            raise
        except Exception as err:  # a bug or a surprise from the client: keep it, retry it
            _record(engine, export_id, state="pending",
                    error=f"{type(err).__name__}: {err}"[:2000], settings=settings)
            raise HandoffError(f"the export failed unexpectedly: {err}") from err
        _record(engine, export_id, state="done", error=None, settings=settings, result=result)
        return result


def _record(engine: Engine, export_id: int, *, state: str, error: str | None,
            settings: Settings, result: dict[str, Any] | None = None) -> None:
    with session_scope(engine) as session:
        row = session.get(MlflowExport, export_id)
        if row is None:
            return
        row.attempts += 1
        row.state, row.last_error = state, error
        if state == "pending":
            delay = min(settings.mlflow_retry_s * 2 ** (row.attempts - 1), MAX_RETRY_DELAY_S)
            row.next_attempt_at = utcnow() + timedelta(seconds=delay)
        else:
            row.next_attempt_at = None
        if result is not None:
            row.result_json = json.dumps(result, sort_keys=True)
            row.exported_at = utcnow()
            # What left the appliance, and to where, belongs in the audit log.
            append_event(session, actor=AUTO_REQUESTER, action="mlflow.exported",
                         subject=f"{row.kind}:{row.subject}", detail=result)
        session.add(row)


def _due(engine: Engine, settings: Settings, now: datetime) -> list[int]:
    """Ids of the exports to try now; re-arms registered releases revoked since."""
    with session_scope(engine) as session:
        revoked = session.exec(
            select(MlflowExport).join(Release, col(Release.release_id) == MlflowExport.subject)
            .where(MlflowExport.kind == KIND_RELEASE, MlflowExport.state == "done",
                   col(Release.revoked_at).is_not(None))).all()
        for row in revoked:
            if not json.loads(row.result_json).get("revoked"):
                row.state, row.next_attempt_at = "pending", now
                session.add(row)
        rows = session.exec(select(MlflowExport).where(MlflowExport.state == "pending")
                            .order_by(col(MlflowExport.id))).all()
        due = []
        for row in rows:
            if target_uri(row, settings) is None:
                if row.last_error != NOT_CONFIGURED:
                    row.last_error = NOT_CONFIGURED
                    session.add(row)
            elif row.next_attempt_at is None or row.next_attempt_at <= now:
                assert row.id is not None
                due.append(row.id)
        return due


class ExportWorker:
    """Does the pending exports in the background: at start, then every ``mlflow_retry_s``
    (and at once after a hand-off was added in this process)."""

    def __init__(self, *, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the background thread."""
        _WORKERS.add(self)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="mlflow-export")
        self._thread.start()

    def wake(self) -> None:
        """Look for due exports now instead of at the next period."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the export in progress (if any); what is left stays pending."""
        _WORKERS.discard(self)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run_due(self) -> int:
        """Try every export that is due now, one after the other.

        Returns:
            How many were tried.
        """
        from coordinator.mlflow_export import HandoffError, HandoffRefused

        tried = 0
        for export_id in _due(self.engine, self.settings, utcnow()):
            if self._stop.is_set():
                break
            tried += 1
            try:
                attempt_export(self.engine, self.settings, export_id, only_if_due=True)
            except (HandoffError, HandoffRefused, LookupError) as err:
                log.warning("MLflow export %s: %s", export_id, err)
        return tried

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.run_due()
            except Exception:  # a busy or restarting database: try again next time
                log.exception("the MLflow hand-off could not look for pending exports")
            self._wake.wait(self.settings.mlflow_retry_s)
