"""The model card of a release: what the model is for, how it was trained, its privacy
statement, its evaluation per site and its measured leakage."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

from coordinator import release_gates
from coordinator.models import (
    Project,
    ReleaseCandidate,
    Run,
)
from coordinator.release_lineage import PRIVACY_ACCOUNTANT, PRIVACY_MECHANISM
from export.bundle_format import ARTEFACT_FILES, FORMATS
from fedward.tasks import TaskSpec
from fedward.wire import MEMBERSHIP_KEY

__all__ = [
    "MEMBERSHIP_METHOD",
    "NOT_COVERED_BY_DP",
    "TRAINING_CURVE_FILE",
    "finite",
    "membership_inference_card",
    "model_card",
]


TRAINING_CURVE_FILE: Final = "training_curve.svg"

# What a release card shows that the DP guarantee does not cover (in its privacy statement).
NOT_COVERED_BY_DP: Final = (
    "held-out evaluation metrics per site (loss, accuracy, AUC, rows evaluated), reported "
    "without noise, and the training curve drawn from them",
    "export parity figures per site (coarse: agreement in twentieths, largest difference as "
    "a power of ten), measured on held-out rows without noise",
    "data fingerprints (row counts, schema hash, keyed file digest)",
    "membership-inference audit figures per site (attack AUCs rounded up to a hundredth, "
    "empirical epsilon lower bound rounded down to a tenth), measured on training and "
    "held-out rows without noise",
)

MEMBERSHIP_METHOD: Final = (
    "Each site attacks the candidate with its own rows: members are its training rows, "
    "non-members its held-out rows. Two attacks on per-example loss: a loss threshold, and "
    "the loss calibrated by the held-out losses of the record's class. AUC 0.5 means the "
    "attacker does no better than guessing. The empirical epsilon lower bound is what the "
    "stronger attack proves (threshold chosen on half of the rows, 95% Clopper-Pearson rates "
    "on the other half); it must stay below the epsilon spent, which is an upper bound."
)


def finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(float(value))


def membership_inference_card(per_site: Any) -> dict[str, Any]:
    """The model card's section on measured leakage, from the sites' audits.

    Args:
        per_site: Site -> ``{"auc", "loss_auc", "calibrated_auc", "epsilon_lower_bound",
            "n"}`` as the parity gate's figures hold them, or ``None``.

    Returns:
        ``{"method", "per_site", "max_site_auc", "sites"}`` (``max_site_auc`` is ``None``
        when no site reported an audit).
    """
    sites = {str(k): dict(v) for k, v in (per_site or {}).items() if isinstance(v, Mapping)}
    aucs = [float(v["auc"]) for v in sites.values() if finite(v.get("auc", math.nan))]
    return {"method": MEMBERSHIP_METHOD, "per_site": sites,
            "max_site_auc": max(aucs) if aucs else None, "sites": len(sites)}


def input_section(spec: TaskSpec, *, study: bool) -> dict[str, Any]:
    """The card's ``input``: the model's columns, classes and, for a run of a ``study``,
    each column's plausible range and the columns the model imputes itself."""
    from export.onnx_export import INPUT_NAME, OUTPUT_NAME

    return {"name": INPUT_NAME, "columns": list(spec.feature_columns),
            "output": OUTPUT_NAME, "n_classes": spec.n_classes,
            "classes": list(spec.class_names),
            "note": "raw values in this column order; the model scales them itself",
            # A study's plausible range per column: what fedward-serve warns outside.
            **({"ranges": [list(r) for r in spec.input_ranges]}
               if study and spec.input_ranges else {}),
            # Columns the model imputes itself when given a missing value (a study's
            # impute-* features, values from the run's DP statistics).
            **({"imputed": [c for c, v in zip(spec.feature_columns,
                                              spec.model_params["fill"], strict=True)
                            if v is not None]}
               if isinstance(spec.model_params.get("fill"), list) else {})}


def model_card(*, release_id: str, cand: ReleaseCandidate, run: Run, project: Project,
                approver: str, reason: str, approved_at: str, task: TaskSpec | None = None
                ) -> dict[str, Any]:
    """The signed model card of a release (``task``: the run's task, resolved from its
    pinned study where it has one; default: the registry task of its name)."""
    from fedward.tasks import get_task

    spec = task if task is not None else get_task(run.task)
    config: dict[str, Any] = json.loads(run.config_json)
    lineage: dict[str, Any] = json.loads(cand.lineage_json)
    gates: list[dict[str, Any]] = json.loads(cand.gates_json)
    by_name = {g["name"]: g for g in gates}
    participation = by_name.get(release_gates.PARTICIPATION_GATE, {}).get("figures") or {}
    parity_figures: dict[str, Any] = by_name.get("export_parity", {}).get("figures", {}) or {}
    privacy = lineage["privacy"]
    per_site_privacy = {s: {"epsilon": v["epsilon_spent"], "delta": v["delta"]}
                        for s, v in privacy["per_site"].items()}
    statement = (
        f"Trained with {PRIVACY_MECHANISM} at every site (per-sample clipping at "
        f"{privacy['max_grad_norm']}, Gaussian noise); each site's privacy loss is accounted "
        f"with the {PRIVACY_ACCOUNTANT.upper()} accountant and stayed within epsilon "
        f"{privacy['epsilon_budget_per_site']} at delta {privacy['delta']} for the whole run "
        f"up to round {cand.round_number}. No patient record left any site. The guarantee "
        "covers the model's weights. It does not cover the held-out metrics: each site's "
        "evaluation figures (loss, accuracy, AUC, row counts), the training curve drawn from "
        "them and the coarse export parity figures are computed on the site's held-out rows "
        "without noise, and so are the coarse membership-inference audit figures (on its "
        "training and held-out rows). No training loss left any site."
    )
    aggregation = privacy.get("aggregation") or {"mode": "plain"}
    if aggregation["mode"] == "secure":
        # The DP-SGD sentence above does not describe such a run.
        statement = (
            "Trained with secure aggregation and distributed differential privacy: each "
            f"site clipped its model update to L2 norm {aggregation['update_clip']}, added "
            "its share of Skellam noise and masked it (SecAgg+); the coordinator unmasked "
            f"only the sum of at least {aggregation['threshold']} sites, never one site's "
            "update. Each site's privacy loss is accounted with the RDP accountant for the "
            "worst case (only the threshold's sites survive a round) and stayed within "
            f"epsilon {privacy['epsilon_budget_per_site']} at delta {privacy['delta']} for "
            f"the whole run up to round {cand.round_number}. No patient record left any "
            "site. The guarantee covers the model's weights, not the held-out metrics each "
            "site reports (evaluation figures, export parity, membership-inference audit).")
    return {
        "release_id": release_id,
        "project": project.name,
        "task": spec.name,
        "task_description": spec.description,
        "intended_use": cand.intended_use,
        "input": input_section(spec, study=bool(config.get("study_hash"))),
        # The study version the run pinned (runs of a registry task have none).
        **({"study": {"ref": config["study"], "sha256": config["study_hash"],
                      "name": spec.name, "classes": list(spec.class_names)}}
           if config.get("study_hash") else {}),
        # The model plugin distribution the run pinned (fedward.plugins), if any.
        **({"model_plugin": {"distribution": config["model_plugin"],
                             "version": config.get("model_plugin_version"),
                             "sha256": config.get("model_plugin_sha256")}}
           if config.get("model_plugin") else {}),
        "model_version": {"run_id": cand.run_id, "round": cand.round_number,
                          "checkpoint_sha256": cand.checkpoint_sha256,
                          "candidate_id": cand.id},
        "metrics_per_site": lineage["evaluation"],
        # A candidate gated before the participation gate existed has no such figures.
        **({"contributing_sites": {
            "completed_rounds": participation["rounds"],
            "rounds_per_site": {s: v["rounds"] for s, v in participation["per_site"].items()},
            "contributing": participation["contributing"],
            "min_sites": participation["min_sites"],
            "min_round_share": participation["min_round_share"],
        }} if participation else {}),
        "privacy_statement": {
            "text": statement,
            "mechanism": PRIVACY_MECHANISM,
            "accountant": PRIVACY_ACCOUNTANT,
            "epsilon_budget_per_site": privacy["epsilon_budget_per_site"],
            "delta": privacy["delta"],
            "per_site": per_site_privacy,
            "not_covered": list(NOT_COVERED_BY_DP),
            "aggregation": aggregation,
        },
        "export_parity": {k: v for k, v in parity_figures.items() if k != MEMBERSHIP_KEY},
        "membership_inference": membership_inference_card(parity_figures.get(MEMBERSHIP_KEY)),
        "formats": {fmt: list(ARTEFACT_FILES[fmt]) for fmt in FORMATS},
        "gates": gates,
        "approval": {"proposed_by": cand.proposed_by, "proposed_at": cand.created_at.isoformat(),
                     "approved_by": approver, "approved_at": approved_at, "reason": reason},
        "training_curve": TRAINING_CURVE_FILE,
        "lineage": lineage,
    }
