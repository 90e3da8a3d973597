"""Benchmark: the drift alarm raised for the one site and feature that shifted, and only there.

Target (issue 12): shift one feature's distribution at one site by 0.5 standard deviations,
show the alarm raised for that site and feature only, and report the false-alarm rate on
unshifted data.

Population: scikit-learn's breast cancer rows (569, bundled, no download). The reference is
built as the statistics phase builds it: three training sites (a random split of the
population) each bin their rows on 10 equal bins over each feature's published range and
add Gaussian noise to their histogram (noise multiplier 1, L2 sensitivity sqrt(30): one
row touches one bin of each of the 30 features); only the noised histograms are summed.
Each check draws ``--rows`` recent rows per site from the population (bootstrap); at site
``hospital-a`` the feature ``--feature`` is shifted by ``--shift`` of its standard
deviation. Each check runs the site's own code (:mod:`site_agent.drift_stats` on the
binned rows, :func:`site_agent.drift.disclose` with the policy's default Gaussian noise or
unnoised) and the coordinator's alarm rule (:func:`coordinator.drift.alarm_features`: PSI
above 0.25 or p below 0.01 / 30). Repeated ``--checks`` times per site, with a new
reference every ``--checks / 10`` checks. Each treatment twice: with the reference's noise
known to the check (the site's own statistics noise times sqrt(sites), or a stated
``noise_std``) and not known (the reference taken as exact).

    .venv/bin/python bench/drift.py [--checks 400] [--rows 300] [--shift 0.5]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu

SITES = ("hospital-a", "hospital-b", "hospital-c")
BINS = 10


def reference(pool: np.ndarray, edges: list[np.ndarray], rng: np.random.Generator
              ) -> list[np.ndarray]:
    """DP reference histograms: three sites' noised histograms, summed, clipped at 0."""
    from site_agent.drift_stats import bin_counts

    order = rng.permutation(len(pool))
    parts = np.array_split(pool[order], 3)
    sigma = 1.0 * np.sqrt(pool.shape[1])
    out = []
    for j, e in enumerate(edges):
        total = sum(bin_counts(p[:, j], e) + rng.normal(0.0, sigma, BINS) for p in parts)
        out.append(np.clip(total, 0.0, None))
    return out


def check(pool: np.ndarray, names: list[str], edges: list[np.ndarray], ref: list[np.ndarray],
          *, rows: int, shift: dict[int, float], treatment: str, ref_std: float,
          rng: np.random.Generator) -> dict[str, Any]:
    """One site's check, through the site's disclosure and the coordinator's alarm rule."""
    from coordinator.drift import AlarmRule, alarm_features
    from site_agent.drift import DriftResult, disclose
    from site_agent.drift_policy import DriftDisclosure
    from site_agent.drift_stats import bin_counts, feature_score

    x = pool[rng.integers(0, len(pool), rows)].copy()
    for j, delta in shift.items():
        x[:, j] += delta
    observed = tuple(bin_counts(x[:, j], e) for j, e in enumerate(edges))
    result = DriftResult(
        release_id="bench-run1-round1-c1", project="bench", names=tuple(names),
        observed=observed, reference=tuple(ref),
        scores={n: feature_score(o, r, ref_noise_std=ref_std)
                for n, o, r in zip(names, observed, ref, strict=True)},
        n_rows=rows, correct=None, score_hist=None, accuracy=None, auc=None,
        ref_noise_std=ref_std)
    report, _ = disclose(result, DriftDisclosure(disclosure=treatment), rng=rng, epsilon=1.0)
    return {"alarm": alarm_features(report["features"], AlarmRule()),
            "psi": {n: s["psi"] for n, s in report["features"].items()},
            "p": {n: s["p_value"] for n, s in report["features"].items()}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer

    from fedward.tasks import BREAST_CANCER_RANGES, get_task

    names = list(get_task("breast_cancer_mlp").feature_columns)
    pool = np.asarray(load_breast_cancer().data, dtype=np.float64)
    edges = [np.linspace(*BREAST_CANCER_RANGES[n], BINS + 1) for n in names]
    target = names.index(args.feature)
    delta = args.shift * float(pool[:, target].std())
    rng = np.random.default_rng(args.seed)
    out: dict[str, Any] = {}
    sigma_ref = float(np.sqrt(3 * len(names)))   # three sites, sqrt(30) each
    for treatment, ref_std in (("gaussian", sigma_ref), ("unnoised", sigma_ref),
                               ("gaussian", 0.0), ("unnoised", 0.0)):
        label = f"{treatment}, reference noise {'known' if ref_std else 'not known'}"
        alarms: dict[str, Counter[str]] = {s: Counter() for s in SITES}
        any_alarm = Counter[str]()
        psi_target: dict[str, list[float]] = {s: [] for s in SITES}
        psi_other: list[float] = []
        ref = reference(pool, edges, rng)
        for i in range(args.checks):
            if i and i % max(1, args.checks // 10) == 0:
                ref = reference(pool, edges, rng)
            for site in SITES:
                shift = {target: delta} if site == SITES[0] else {}
                got = check(pool, names, edges, ref, rows=args.rows, shift=shift,
                            treatment=treatment, ref_std=ref_std, rng=rng)
                alarms[site].update(got["alarm"])
                any_alarm[site] += bool(got["alarm"]) and not (
                    site == SITES[0] and got["alarm"] == [args.feature])
                psi_target[site].append(got["psi"][args.feature])
                psi_other += [v for n, v in got["psi"].items() if n != args.feature]
        n = args.checks
        unshifted_tests = n * (len(SITES) * len(names) - 1)
        false_tests = sum(c for s, cnt in alarms.items() for f, c in cnt.items()
                          if not (s == SITES[0] and f == args.feature))
        out[label] = {
            "detection_rate": alarms[SITES[0]][args.feature] / n,
            "false_alarm_rate_per_feature_test": false_tests / unshifted_tests,
            "false_alarm_rate_per_unshifted_check": sum(
                any_alarm[s] for s in SITES[1:]) / (n * (len(SITES) - 1)),
            "checks_of_shifted_site_with_another_feature_alarmed": any_alarm[SITES[0]] / n,
            "median_psi_shifted": bu.median(psi_target[SITES[0]]),
            "median_psi_same_feature_unshifted_sites": bu.median(
                psi_target[SITES[1]] + psi_target[SITES[2]]),
            "median_psi_other_features": bu.median(psi_other),
            "most_alarmed_elsewhere": [
                f"{s}/{f}: {c}" for s in SITES for f, c in alarms[s].most_common(3)
                if not (s == SITES[0] and f == args.feature)][:5],
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checks", type=int, default=400, help="checks per site and treatment")
    ap.add_argument("--rows", type=int, default=300, help="recent rows per check")
    ap.add_argument("--shift", type=float, default=0.5, help="shift in standard deviations")
    ap.add_argument("--feature", default="mean_radius")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    res = run(args)
    rows = []
    for treatment, r in res.items():
        rows.append([treatment, f"{r['detection_rate']:.3f}",
                     f"{r['false_alarm_rate_per_unshifted_check']:.4f}",
                     f"{r['false_alarm_rate_per_feature_test']:.5f}",
                     f"{r['checks_of_shifted_site_with_another_feature_alarmed']:.4f}",
                     bu.fmt(r["median_psi_shifted"], 3),
                     bu.fmt(r["median_psi_same_feature_unshifted_sites"], 3),
                     bu.fmt(r["median_psi_other_features"], 3),
                     bu.fmt(r["median_psi_shifted"]
                            / r["median_psi_same_feature_unshifted_sites"], 1)])
    md = (f"Drift alarm: `{args.feature}` shifted by {args.shift} standard deviations at "
          f"hospital-a only; {args.checks} checks per site and treatment, {args.rows} recent "
          "rows per check (bootstrap from the 569 breast cancer rows), reference from three "
          "sites' DP-noised histograms (noise multiplier 1), 10 bins per feature over its "
          "published range; alarm: PSI > 0.25 or p < 0.01 / 30.\n\n"
          + bu.md_table(["treatment", "detection (shifted site, feature)",
                         "false alarms per unshifted check", "false alarms per feature test",
                         "shifted site: another feature alarmed", "median PSI shifted",
                         "median PSI same feature unshifted", "median PSI other features",
                         "PSI ratio shifted / unshifted"], rows)
          + "\nAlarms elsewhere (most frequent): "
          + "; ".join(f"{t}: {', '.join(r['most_alarmed_elsewhere']) or 'none'}"
                      for t, r in res.items()) + "\n")
    bu.write_results("drift", {"args": vars(args), "results": res}, md)


if __name__ == "__main__":
    main()
