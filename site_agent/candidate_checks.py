"""The checks a site runs on a release candidate it evaluated: export parity
(:mod:`site_agent.parity_task`) and a membership-inference audit
(:mod:`privacy.membership`), both on its own rows; only coarse figures leave.

Parity is measured only of a global model this site evaluated (noted in its parity book),
only for artefacts equal to the site's own export, each format once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from fedward.tasks import TaskSpec
from fedward.wire import CFG, SiteErrorCode
from privacy.membership import audit_membership
from site_agent.answer_egress import finite_metrics
from site_agent.data import SiteData
from site_agent.egress import check_outgoing
from site_agent.parity_task import ParityBook, ParityRefused, measure_parity, model_digest
from site_agent.task_errors import AuditFn, TaskError

__all__ = ["DEFAULT_AUDIT_DELTA", "measure_candidate", "remember_model"]

log = logging.getLogger("fedward.site.trainer")

# The delta a membership audit reads its epsilon bound against when a task names none.
DEFAULT_AUDIT_DELTA: Final = 1e-5


def _parity_book(replies_dir: Path) -> ParityBook:
    return ParityBook(replies_dir / "parity-book.json")


def remember_model(replies_dir: Path, run_id: str, arrays: dict[str, np.ndarray]) -> None:
    """Note a global model this site evaluated: the only models it measures parity of."""
    try:
        _parity_book(replies_dir).remember_model(run_id, model_digest(arrays))
    except (OSError, ValueError) as err:  # parity of this model will be refused
        log.warning("could not note the global model in the parity book: %s", err)


def measure_candidate(config: dict[str, Any], *, task: TaskSpec, model: torch.nn.Module,
                      shapes: dict[str, tuple[int, ...]], model_arrays: dict[str, np.ndarray],
                      files: dict[str, bytes], rows: SiteData, replies_dir: Path,
                      audit: AuditFn) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A candidate's export parity on the held-out split and its membership audit, from
    ``model`` (built from ``model_arrays`` for the run's ``task``) and its exported
    ``files``."""
    run_id = str(config.get(CFG.RUN_ID))
    try:
        outcome = measure_parity(task=task, run_id=run_id,
                                 model_arrays=model_arrays, files=files,
                                 features=rows.test_x,
                                 workdir=replies_dir.parent / "run",
                                 book=_parity_book(replies_dir))
    except ParityRefused as err:
        audit("parity-refused", {"run": run_id, **err.detail})
        raise TaskError(SiteErrorCode.REFUSED_POLICY, f"refused-policy: {err}") from None
    metrics = finite_metrics(outcome.metrics)
    metrics.update(_membership_audit(run_id, config, model, rows=rows, audit=audit))
    report = check_outgoing(expected_shapes=shapes, arrays={}, metrics=metrics)
    audit("parity-measured", {"run": run_id, "model": outcome.model,
                              "formats": outcome.formats, "files": sorted(files),
                              "bytes_out": report.n_bytes,
                              "metrics": report.metric_names})
    return {"metrics": metrics}, {}


def _membership_audit(run_id: str, config: dict[str, Any], model: torch.nn.Module, *,
                      rows: SiteData, audit: AuditFn) -> dict[str, float]:
    """Membership-inference audit of a candidate this site evaluated (privacy.membership):
    the site's training rows against its held-out rows; only coarse figures leave."""
    try:
        delta = float(config.get(CFG.DELTA, DEFAULT_AUDIT_DELTA))
        result = audit_membership(model=model, train_x=rows.train_x,
                                  train_y=rows.train_y, test_x=rows.test_x,
                                  test_y=rows.test_y, delta=delta)
    except ValueError as err:  # too few rows, or a model giving NaN: no figures
        audit("membership-audit-skipped", {"run": run_id, "reason": str(err)})
        return {}
    figures = result.coarse()
    audit("membership-audited", {"run": run_id, **figures})
    return figures
