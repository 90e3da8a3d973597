"""The egress guard on every answer of the warm trainer, at the one point where it is
handed back, whatever produced it (:mod:`site_agent.egress` holds the checks).

Only model-shaped arrays (train answers), allow-listed metrics and the fixed-format text
parts leave; a statistics answer is checked against the release the ledger charged, a
secure-aggregation stage against its protocol's shapes. A blocked answer becomes an
``EGRESS_BLOCKED`` error and an ``egress-blocked`` audit entry.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np

from fedward.statistics import expected_shape
from fedward.tasks import TaskRef
from fedward.wire import CFG, SiteErrorCode
from privacy import GaussianRelease, PrivacyLedger
from site_agent.egress import EgressViolation, check_reply, check_statistics_reply
from site_agent.secagg_site import check_egress
from site_agent.statistics import run_statistics_mechanisms
from site_agent.task_errors import AuditFn

__all__ = ["finite_metrics", "guard_answer"]

log = logging.getLogger("fedward.site.trainer")


def finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics with a finite value (no NaN or infinity leaves the site)."""
    return {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}


def guard_answer(header: dict[str, Any], reply: dict[str, Any], out: dict[str, np.ndarray], *,
                 ledger: PrivacyLedger, model_shapes: Callable[[], dict[str, tuple[int, ...]]],
                 statistics_task: Callable[[], TaskRef],
                 audit: AuditFn
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The egress guard on a whole answer: only model-shaped arrays (train answers),
    allow-listed metrics and the fixed-format text parts leave."""
    kind = str(header.get("kind", ""))
    try:
        if kind == "statistics":
            _check_statistics_egress(header, reply, out, ledger=ledger,
                                     statistics_task=statistics_task)
        elif kind == "secagg":
            config = header.get("config") if isinstance(header.get("config"), dict) else {}
            assert isinstance(config, dict)
            dim = sum(math.prod(s) for s in model_shapes().values())
            problems = check_egress(config, reply, out, dim)
            if problems:
                raise EgressViolation(problems)
        else:
            check_reply(reply=reply, arrays=out,
                        expected_shapes=model_shapes() if kind == "train" else {})
    except EgressViolation as err:
        config = header.get("config") if isinstance(header.get("config"), dict) else {}
        assert isinstance(config, dict)
        audit("egress-blocked", {"run": str(config.get(CFG.RUN_ID, "?")),
                                 "round": config.get(CFG.ROUND), "kind": kind,
                                 "problems": err.problems})
        log.error("blocked an outgoing answer: %s", err)
        return {"error": {"code": SiteErrorCode.EGRESS_BLOCKED, "reason": str(err)}}, {}
    return reply, out


def _check_statistics_egress(header: dict[str, Any], reply: dict[str, Any],
                             out: dict[str, np.ndarray], *, ledger: PrivacyLedger,
                             statistics_task: Callable[[], TaskRef]) -> None:
    """The egress guard on a statistics answer, against the release the ledger charged."""
    config = header.get("config") if isinstance(header.get("config"), dict) else {}
    assert isinstance(config, dict)
    charged = [m for m in run_statistics_mechanisms(
        ledger, str(config.get(CFG.RUN_ID))) if isinstance(m, GaussianRelease)]
    check_statistics_reply(reply=reply, arrays=out,
                           shape=expected_shape(statistics_task()),
                           charged_noise_std=charged[0].noise_std if charged else None)
