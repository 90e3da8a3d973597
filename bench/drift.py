"""Benchmark: the drift alarm raised for the one site and feature that shifted, and only there.

Target (issue 12): shift one feature's distribution at one site by 0.5 standard deviations,
show the alarm raised for that site and feature only, and report the false-alarm rate on
unshifted data.

Everything runs through the code a federation runs, in one process:

* **The reference** is made as a run's statistics phase makes it. Three training sites (a
  random three-way split of scikit-learn's 569 breast cancer rows, bundled, no download,
  about 190 rows each; and ``--train-rows`` rows each, drawn with replacement, as larger
  hospitals would hold: one set of results per size) each compute their release with
  the site's own code (:func:`site_agent.statistics.exact_sums` over the study's bins) and
  add the Gaussian noise of the mechanism the site charges
  (:func:`site_agent.statistics.statistics_mechanism`: the run's ``--epsilon`` times the
  default statistics share, 0.1, at ``--delta``); the coordinator sums the noised releases
  into ``reference_statistics.json`` (:func:`fedward.statistics.reference_document`, which
  states the noise of each summed count, ``privacy.noise_std``, as the coordinator does
  since it writes it). The file is shipped in a real signed release bundle (an ONNX export
  of the task's model, signed with a fresh release key), and the check reads it back as a
  site does (:func:`export.bundle_verify.verify_bundle`,
  :func:`site_agent.drift.load_reference`). A new reference every ``--checks / 10``
  checks.
* **Each check** draws ``--rows`` recent rows per site from the population (with
  replacement); at ``hospital-a`` the feature ``--feature`` is shifted by ``--shift`` of its
  standard deviation. The site scores them as :func:`site_agent.drift.run_check` does (the
  rows binned on the reference's edges, :func:`site_agent.drift_stats.feature_score` with
  the reference's stated noise), discloses the report as its policy says
  (:func:`site_agent.drift.disclose`: the default Gaussian noise, multiplier 1, or
  unnoised), and the coordinator reads it under its alarm rule
  (:func:`coordinator.drift.alarm_features`: PSI above 0.25 or p below 0.01 / 30).

Four treatments, ``--checks`` checks per site each: the default path (Gaussian disclosure,
reference noise stated in the file), the unnoised disclosure, and both again with a file
that does not state its noise, read by a site that took no part in the statistics phase
(the check then takes the reference as exact, as before the coordinator wrote
``noise_std``).

    nice -n 10 .venv/bin/python bench/drift.py [--checks 300] [--rows 300] [--shift 0.5]
        [--epsilon 3] [--train-rows split 5000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil as bu

if TYPE_CHECKING:
    from site_agent.drift import Reference

SITES = ("hospital-a", "hospital-b", "hospital-c")
TASK = "breast_cancer_mlp"


class Releases:
    """Signed release bundles of one exported model, each with its own reference file."""

    def __init__(self, work: Path) -> None:
        from export.bundle_keys import generate_release_key, public_key_path
        from export.onnx_export import export_onnx
        from fedward.tasks import build_model, get_task

        self.work = work
        self.key = work / "release.key"
        generate_release_key(self.key)
        self.public = public_key_path(self.key)
        onnx = export_onnx(model=build_model(TASK, seed=0), task=TASK, out_dir=work / "model")
        self.model_files = {p.name: p for p in onnx.parent.iterdir()
                            if p.name.startswith(onnx.name)}
        spec = get_task(TASK)
        self.card = {"project": "bench", "task": TASK,
                     "input": {"name": "features", "columns": list(spec.feature_columns),
                               "n_classes": spec.n_classes,
                               "classes": list(spec.class_names)}}
        self.made = 0

    def reference(self, doc: dict[str, Any]) -> Reference:
        """Ship ``doc`` in a new signed bundle and read it back as a site's check does."""
        import json

        from export.bundle import write_bundle
        from export.bundle_verify import verify_bundle
        from site_agent.drift import REFERENCE_FILE, load_reference

        self.made += 1
        release_id = f"bench-run1-round1-c{self.made}"
        ref = self.work / f"ref-{self.made}.json"
        ref.write_text(json.dumps(doc))
        bundle = write_bundle(out_dir=self.work / "releases" / release_id,
                              files={**self.model_files, REFERENCE_FILE: ref},
                              model_card={**self.card, "release_id": release_id},
                              private_key=self.key)
        return load_reference(verify_bundle(bundle_dir=bundle, public_key=self.public))


def statistics_reference(pool: np.ndarray, rng: np.random.Generator, *, epsilon: float,
                         delta: float, train_rows: int | None, state_noise: bool
                         ) -> dict[str, Any]:
    """``reference_statistics.json`` as a run's statistics phase writes it."""
    from fedward.run_config import DEFAULT_STATISTICS_SHARE
    from fedward.statistics import feature_bins, reference_document, study_identity
    from site_agent.statistics import exact_sums, noised, statistics_mechanism

    share = DEFAULT_STATISTICS_SHARE * epsilon
    mechanism = statistics_mechanism(task=TASK, epsilon=share, delta=delta)
    bins = feature_bins(TASK)
    if train_rows is None:
        parts = np.array_split(pool[rng.permutation(len(pool))], len(SITES))
    else:
        parts = [pool[rng.integers(0, len(pool), train_rows)] for _ in SITES]
    total = np.sum([noised(exact_sums(p, bins), noise_std=mechanism.noise_std, rng=rng)
                    for p in parts], axis=0)
    return reference_document(
        run_id=1, study=study_identity(TASK, None, None), epsilon=share, delta=delta,
        sites=len(SITES), task=TASK, total=total,
        site_noise_std=mechanism.noise_std if state_noise else None)


def check(pool: np.ndarray, columns: list[str], reference: Reference, *, rows: int,
          shift: dict[int, float], treatment: str, rng: np.random.Generator
          ) -> dict[str, Any]:
    """One site's check, through the site's disclosure and the coordinator's alarm rule."""
    from coordinator.drift import AlarmRule, alarm_features
    from fedward.drift_psi import bin_counts
    from site_agent.drift import DriftResult, disclose
    from site_agent.drift_policy import DriftDisclosure
    from site_agent.drift_stats import feature_score

    x = pool[rng.integers(0, len(pool), rows)].copy()
    for j, delta in shift.items():
        x[:, j] += delta
    # As run_check: the file's stated noise; without it (and no ledger entry of this run
    # at the site) the reference is taken as exact.
    ref_std = reference.noise_std or 0.0
    observed = tuple(bin_counts(x[:, columns.index(f.name)], f.edges)
                     for f in reference.features)
    names = tuple(f.name for f in reference.features)
    result = DriftResult(
        release_id="bench-run1-round1-c1", project="bench", names=names, observed=observed,
        reference=tuple(f.counts for f in reference.features),
        scores={f.name: feature_score(o, f.counts, ref_noise_std=ref_std)
                for f, o in zip(reference.features, observed, strict=True)},
        n_rows=rows, correct=None, score_hist=None, accuracy=None, auc=None,
        ref_noise_std=ref_std)
    report, _ = disclose(result, DriftDisclosure(disclosure=treatment), rng=rng, epsilon=1.0)
    return {"alarm": alarm_features(report["features"], AlarmRule()),
            "psi": {n: s["psi"] for n, s in report["features"].items()}}


def run(args: argparse.Namespace, releases: Releases, train_rows: int | None
        ) -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer

    from fedward.tasks import get_task

    columns = list(get_task(TASK).feature_columns)
    pool = np.asarray(load_breast_cancer().data, dtype=np.float64)
    target = columns.index(args.feature)
    delta = args.shift * float(pool[:, target].std())
    rng = np.random.default_rng(args.seed)
    out: dict[str, Any] = {}
    for treatment, stated in (("gaussian", True), ("unnoised", True),
                              ("gaussian", False), ("unnoised", False)):
        label = f"{treatment}, reference noise {'stated' if stated else 'not stated'}"

        def new_reference(stated: bool = stated) -> Reference:
            return releases.reference(statistics_reference(
                pool, rng, epsilon=args.epsilon, delta=args.delta,
                train_rows=train_rows, state_noise=stated))

        alarms: dict[str, Counter[str]] = {s: Counter() for s in SITES}
        any_alarm = Counter[str]()
        psi_target: dict[str, list[float]] = {s: [] for s in SITES}
        psi_other: list[float] = []
        ref = new_reference()
        ref_std = ref.noise_std
        for i in range(args.checks):
            if i and i % max(1, args.checks // 10) == 0:
                ref = new_reference()
            for site in SITES:
                shift = {target: delta} if site == SITES[0] else {}
                got = check(pool, columns, ref, rows=args.rows, shift=shift,
                            treatment=treatment, rng=rng)
                alarms[site].update(got["alarm"])
                any_alarm[site] += bool(got["alarm"]) and not (
                    site == SITES[0] and got["alarm"] == [args.feature])
                psi_target[site].append(got["psi"][args.feature])
                psi_other += [v for n, v in got["psi"].items() if n != args.feature]
        n = args.checks
        unshifted_tests = n * (len(SITES) * len(columns) - 1)
        false_tests = sum(c for s, cnt in alarms.items() for f, c in cnt.items()
                          if not (s == SITES[0] and f == args.feature))
        out[label] = {
            "reference_noise_std": ref_std,
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


def _size_label(value: str) -> str:
    if value == "split":
        return "about 190 (569 split three ways)"
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"--train-rows: {value!r} is neither 'split' nor a positive number")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checks", type=int, default=300, help="checks per site and treatment")
    ap.add_argument("--rows", type=int, default=300, help="recent rows per check")
    ap.add_argument("--shift", type=float, default=0.5, help="shift in standard deviations")
    ap.add_argument("--feature", default="mean_radius")
    ap.add_argument("--epsilon", type=float, default=3.0,
                    help="the run's epsilon; its statistics phase spends the default tenth")
    ap.add_argument("--delta", type=float, default=1e-5, help="the run's delta")
    ap.add_argument("--train-rows", nargs="+", default=["split", "5000"],
                    help="rows per training site, drawn with replacement, or 'split': a "
                         "three-way split of the 569 rows; one set of results each")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = {_size_label(t): None if t == "split" else int(t) for t in args.train_rows}
    with tempfile.TemporaryDirectory(prefix="fedward-drift-bench-") as work:
        releases = Releases(Path(work))
        res = {label: run(args, releases, rows) for label, rows in sizes.items()}
    from fedward.run_config import DEFAULT_STATISTICS_SHARE

    rows = []
    for size, by_treatment in res.items():
        for treatment, r in by_treatment.items():
            rows.append([size, treatment, bu.fmt(r["reference_noise_std"], 1),
                         f"{r['detection_rate']:.3f}",
                         f"{r['false_alarm_rate_per_unshifted_check']:.4f}",
                         f"{r['false_alarm_rate_per_feature_test']:.5f}",
                         f"{r['checks_of_shifted_site_with_another_feature_alarmed']:.4f}",
                         bu.fmt(r["median_psi_shifted"], 3),
                         bu.fmt(r["median_psi_same_feature_unshifted_sites"], 3),
                         bu.fmt(r["median_psi_other_features"], 3)])
    share = DEFAULT_STATISTICS_SHARE * args.epsilon
    md = (f"Drift alarm: `{args.feature}` shifted by {args.shift} standard deviations at "
          f"hospital-a only; {args.checks} checks per site and treatment, {args.rows} recent "
          "rows per check (drawn with replacement from the 569 breast cancer rows). "
          f"Reference: the statistics phase of a run with epsilon {args.epsilon:g} (the "
          f"default share, {share:g}, spent on statistics at delta {args.delta:g}) at three "
          "sites (their training rows: a three-way split of the 569 rows, or N rows each "
          "drawn with replacement), shipped in a signed release and read back by the check; "
          "10 bins per feature over its published range. Disclosure: the site policy's "
          "Gaussian default (noise multiplier 1) or unnoised. Alarm: PSI > 0.25 or "
          "p < 0.01 / 30.\n\n"
          + bu.md_table(["training rows per site", "treatment",
                         "reference noise std per bin (stated)",
                         "detection (shifted site, feature)",
                         "false alarms per unshifted check", "false alarms per feature test",
                         "shifted site: another feature alarmed", "median PSI shifted",
                         "median PSI same feature unshifted", "median PSI other features"],
                        rows)
          + "\nAlarms elsewhere (most frequent): "
          + "; ".join(f"{size}, {t}: {', '.join(r['most_alarmed_elsewhere']) or 'none'}"
                      for size, by in res.items() for t, r in by.items()) + "\n")
    bu.write_results("drift", {"args": vars(args), "results": res}, md)


if __name__ == "__main__":
    main()
