"""A model version's lineage: the run, rounds, sites, data fingerprints, privacy and
software that made it, as the model card and the release bundle record it."""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine
from sqlmodel import col, select

from coordinator import run_audit
from coordinator.checkpoints import CheckpointError, load_checkpoint
from coordinator.db import session_scope
from coordinator.models import (
    Round,
)
from coordinator.release_queries import checkpoint_row, metrics_by_round, run_and_project
from fedward import code_revision

__all__ = [
    "DATA_FINGERPRINT_METHOD",
    "EPSILON_METRIC",
    "EVAL_METRICS",
    "FINGERPRINTS_NOT_REPORTED",
    "FINGERPRINT_METRIC_PREFIX",
    "PRIVACY_ACCOUNTANT",
    "PRIVACY_MECHANISM",
    "aggregation_mode",
    "build_lineage",
]


PRIVACY_MECHANISM: Final = "DP-SGD"
# The site agent's ledger accountant (dp-accounting's privacy loss distributions,
# privacy.accounting); sites report only the epsilon.

# The site agent's ledger accountant (dp-accounting's privacy loss distributions,
# privacy.accounting); sites report only the epsilon.
PRIVACY_ACCOUNTANT: Final = "pld"

FINGERPRINTS_NOT_REPORTED: Final = "not reported: no site sent a data fingerprint for this run"
# What a release card shows that the DP guarantee does not cover (in its privacy statement).

DATA_FINGERPRINT_METHOD: Final = (
    "content-hmac: HMAC-SHA256 of the site's data file under a key only that site holds (so "
    "nobody with a copy of a file can confirm a site holds it; an auditor the site gives its "
    "key recomputes it, see `fedward-site fingerprint --reveal-key`); schema-hash: SHA-256 "
    "of the declared data schema; n-rows, n-train, n-test: row counts")

EPSILON_METRIC: Final = "epsilon-spent"

FINGERPRINT_METRIC_PREFIX: Final = "fingerprint-"
# Site metric names (fedward.wire.ALLOWED_REPLY_METRICS) -> evaluation figure names.

# Site metric names (fedward.wire.ALLOWED_REPLY_METRICS) -> evaluation figure names.
EVAL_METRICS: Final[Mapping[str, str]] = {
    "eval-auc": "auc",
    "eval-accuracy": "accuracy",
    "eval-loss": "loss",
    "num-eval-examples": "n",
}


_PACKAGES: Final = ("fedward", "flwr", "torch", "opacus", "onnx", "onnxruntime", "openvino",
                    "model-signing")


@functools.cache
def _software() -> dict[str, Any]:
    """Versions of the packages installed here, the code revision and the Flower app hash."""
    from fedward.flower.fab import app_bundle  # imports flwr: only when needed

    packages: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = "not installed"
    return {
        "packages": packages,
        "code_revision": code_revision(),
        "flower_app_bundle_sha256": app_bundle()[1],
        "note": "installed on the coordinator when this lineage was recorded",
    }


def _evaluation(metrics: Mapping[int, Mapping[str, Mapping[str, float]]], round_number: int,
                final_round: int) -> dict[str, Any]:
    """What the sites measured of the model saved after ``round_number``.

    A site evaluates the global model it receives before it trains, so the model saved
    after round r is evaluated at the start of round r + 1; the model after the last round
    is evaluated once more at the end (``final-*`` metrics).
    """
    sources: list[tuple[int, str, str]] = []
    if round_number == final_round:
        sources.append((round_number, "final-", "final evaluation at each site after the "
                        f"last round ({round_number})"))
    sources.append((round_number + 1, "", f"evaluated at each site at the start of round "
                    f"{round_number + 1}"))
    for at, prefix, source in sources:
        per_site: dict[str, dict[str, float]] = {}
        for site, values in sorted(metrics.get(at, {}).items()):
            figures = {short: values[prefix + name] for name, short in EVAL_METRICS.items()
                       if prefix + name in values}
            if figures:
                per_site[site] = figures
        if per_site:
            return {"source": source, "per_site": per_site}
    return {"source": "no site reported an evaluation of this version", "per_site": {}}


def _participants(rounds: Sequence[Round]) -> list[str]:
    sites: set[str] = set()
    for r in rounds:
        sites.update(json.loads(r.participating_sites_json))
    return sorted(sites)


def _privacy(config: Mapping[str, Any], metrics: Mapping[int, Mapping[str, Mapping[str, float]]],
             round_number: int, participants: Sequence[str]) -> dict[str, Any]:
    per_site: dict[str, dict[str, Any]] = {}
    for site in participants:
        latest: tuple[int, float] | None = None
        for number in sorted(metrics):
            value = metrics[number].get(site, {}).get(EPSILON_METRIC)
            if number <= round_number and value is not None:
                latest = (number, value)
        per_site[site] = {
            "epsilon_spent": None if latest is None else latest[1],
            "reported_in_round": None if latest is None else latest[0],
            "delta": config.get("delta"),
        }
    return {
        "mechanism": PRIVACY_MECHANISM,
        "accountant": PRIVACY_ACCOUNTANT,
        "epsilon_budget_per_site": config.get("epsilon"),
        "delta": config.get("delta"),
        "max_grad_norm": config.get("max_grad_norm"),
        "per_site": per_site,
        "aggregation": aggregation_mode(config),
    }


def aggregation_mode(config: Mapping[str, Any]) -> dict[str, Any]:
    """How the run combined the sites' updates: in the clear, or secure aggregation (the
    coordinator saw only the sum, whose noise the sites added in shares)."""
    if not config.get("secure_aggregation"):
        return {"mode": "plain", "strategy": config.get("aggregation", "fedavg"),
                "noise": "DP-SGD at each site"}
    threshold = config.get("secagg_threshold") or max(2, int(config.get("min_sites", 1)))
    return {"mode": "secure", "strategy": "fedavg of the unmasked sum",
            "protocol": "SecAgg+ (the coordinator never holds one site's update)",
            "noise": "distributed Skellam: each site adds its share, sized for the "
                     "threshold; accounted with RDP",
            "threshold": threshold, "update_clip": config.get("secagg_clip")}


def _fingerprints_from_metrics(metrics: Mapping[int, Mapping[str, Mapping[str, float]]],
                               round_number: int) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for number in sorted(metrics):
        if number > round_number:
            continue
        for site, values in sorted(metrics[number].items()):
            found = {k.removeprefix(FINGERPRINT_METRIC_PREFIX): v for k, v in values.items()
                     if k.startswith(FINGERPRINT_METRIC_PREFIX)}
            if found:
                out.setdefault(site, []).append({"round": number, "fingerprint": found})
    return out


def build_lineage(engine: Engine, *, home: Path, run_id: int, round_number: int
                  ) -> dict[str, Any]:
    """The lineage of one model version, from the database and the checkpoint file.

    Open no transaction on ``engine``'s database around this call (it opens its own).

    Args:
        engine: Coordinator database engine.
        home: The coordinator's data directory (checkpoints are under it).
        run_id: The run.
        round_number: The round whose checkpoint is the version.

    Returns:
        JSON-ready lineage: ``version`` (checkpoint path, digest, parameter shapes),
        ``run`` (config and seed), ``software`` (package versions, code revision, Flower app
        bundle hash), ``rounds`` (sites per round), ``privacy`` (epsilon and delta per
        site), ``evaluation`` (per-site metrics of this version) and ``data_fingerprints``
        (``None`` with ``data_fingerprints_note`` when no site reported one) with
        ``data_fingerprint_method`` (what each fingerprint field is).

    Raises:
        NotFound: No such run or checkpoint.
    """
    with session_scope(engine) as session:
        run, project = run_and_project(session, run_id)
        ckpt = checkpoint_row(session, run_id, round_number)
        rounds = session.exec(select(Round).where(Round.run_id == run_id,
                                                  Round.number <= round_number)
                              .order_by(col(Round.number))).all()
        metrics = metrics_by_round(session, run_id)
        config: dict[str, Any] = json.loads(run.config_json)
        run_info = {
            "id": run_id, "project": project.name, "task": run.task, "status": run.status,
            "launched_by": run.launched_by, "flwr_run_id": run.flwr_run_id,
            "created_at": run.created_at.isoformat(),
            "started_at": run.started_at.isoformat() if run.started_at else None,
            "finished_at": run.finished_at.isoformat() if run.finished_at else None,
            "seed": config.get("seed"), "config": config,
        }
        rounds_info = [{"number": r.number, "status": r.status,
                        "participating_sites": json.loads(r.participating_sites_json),
                        "failed_sites": json.loads(r.failed_sites_json),
                        "late_sites": json.loads(r.late_sites_json)} for r in rounds]
        participants = _participants(rounds)
        ckpt_path, ckpt_sha = ckpt.path, ckpt.sha256
    version: dict[str, Any] = {"run_id": run_id, "round": round_number,
                               "checkpoint": {"path": ckpt_path, "sha256": ckpt_sha}}
    try:
        arrays = load_checkpoint(home / ckpt_path, expected_sha256=ckpt_sha)
        version["checkpoint"]["status"] = "ok: matches its recorded SHA-256"
        version["parameters"] = {k: list(v.shape) for k, v in arrays.items()}
        version["n_parameters"] = int(sum(v.size for v in arrays.values()))
    except CheckpointError as err:
        version["checkpoint"]["status"] = f"unusable: {err}"
    fingerprints = {site: [e for e in entries if int(e.get("round", 0)) <= round_number]
                    for site, entries in run_audit.data_fingerprints(engine, run_id).items()}
    fingerprints = {s: e for s, e in fingerprints.items() if e}
    if not fingerprints:
        fingerprints = _fingerprints_from_metrics(metrics, round_number)
    return {
        "version": version,
        "run": run_info,
        "software": _software(),
        "rounds": rounds_info,
        "participating_sites": participants,
        "privacy": _privacy(config, metrics, round_number, participants),
        "evaluation": _evaluation(metrics, round_number, int(config.get("rounds", 0))),
        "data_fingerprints": fingerprints or None,
        "data_fingerprints_note": None if fingerprints else FINGERPRINTS_NOT_REPORTED,
        "data_fingerprint_method": DATA_FINGERPRINT_METHOD,
    }
