"""``python -m coordinator.study_demo`` (``make demo-study``): a study of one's own, on real
data recorded at four real hospitals, end to end on this machine.

The UCI Heart Disease data (Cleveland, Hungary, Switzerland, VA Long Beach; shipped in the
``study-demo`` extra, nothing downloaded), one file per hospital in the data set's own
column names and codes. Like ``fedward-demo`` (:mod:`coordinator.demo`, whose process and
release helpers it reuses) it plays every role with the real command-line tools, each in a
process of its own:

1. writes the hospitals' files (``python -m site_agent.study_demo_data``);
2. starts the coordinator and registers the study (``examples/study_demo``);
3. enrolls each site through a one-time token and the site gateway; the site checks its
   mapping and its policy approves the study's hash; starts the site agents;
4. launches the statistics phase and DP-SGD training, epsilon 3 per site in total (half of
   it to the statistics by default: on a few hundred rows per site a smaller share leaves
   the imputation and scaling far from the data);
5. evaluates per site, on the site's held-out split: the federated model, the site's
   local-only DP model at the same budget and the pooled non-private model
   (``python -m site_agent.study_demo_eval``; the data is public, so the demo computes the
   local-only and pooled models in one process from the sites' files: at a real site the
   local-only model would be trained there, and no pooled model could exist);
6. proposes the model, a second person approves it, verifies the signed bundle, serves it
   and asks it about the first row of Cleveland's file: by the study's field names, as a
   clinician would type it (``{"age": 63, "sex": "male", ...}``, the row translated by
   Cleveland's mapping), and as the model's encoded input columns; both answers agree.

Writes ``demo-output/study/summary.json``; stops every process it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.table import Table

from coordinator.demo import BIN, Procs, _release_and_clinician, _run, _wait_http, console
from fedward.flower.control import FlowerControl
from fedward.procs import free_port
from fedward.study import load_spec

__all__ = ["main", "run_study_demo"]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "study_demo"
PROJECT = "demo-study"
_USE = ("Demonstration only: angiographic heart disease from routine findings (UCI Heart "
        "Disease, four hospitals); not for patient care.")


def _enroll_sites(*, work: Path, home: Path, env: dict[str, str], files: dict[str, str],
                  spec_file: Path, procs: Procs) -> None:
    site_cli, coord_cli = str(BIN / "fedward-site"), str(BIN / "fedward-coordinator")
    fleet = (home / "fleet.address").read_text().strip()
    for name, data in files.items():
        d = work / "sites" / name
        _run([site_cli, "init", "--dir", str(d), "--name", name, "--project", PROJECT,
              "--superlink", fleet, "--ca-cert", str(home / "pki" / "ca.pem"), "--data", data,
              "--study", str(spec_file), "--mapping", str(EXAMPLES / f"mapping-{name}.json")])
        token = json.loads(_run([coord_cli, "enroll-token", name, "--json"], env=env))["token"]
        # The site's keys are made at the site; only the CSR and public key travel.
        _run([site_cli, "enroll", "--dir", str(d), "--gateway", fleet, "--token", token])
        _run([site_cli, "mapping", "check", "--dir", str(d)])
        _run([site_cli, "policy", "approve-study", str(spec_file), "--project", PROJECT,
              "--dir", str(d), "--by", f"it-{name}"])
        procs.start(f"site {name}", [site_cli, "start", "--dir", str(d)],
                    work / f"site-{name}.log")
        console.print(f"  {name}: enrolled by token, mapping checked, study approved, started")


def _wait_online(home: Path, n: int, timeout: float) -> int:
    control = FlowerControl(address=(home / "superlink.address").read_text().strip(),
                            ca_cert=home / "pki" / "ca.pem")
    deadline = time.monotonic() + timeout
    online = 0
    while time.monotonic() < deadline:
        try:
            online = len(control.online_node_ids())
        except Exception:  # the SuperLink may still be starting: asked again
            online = 0
        if online >= n:
            break
        time.sleep(0.5)
    return online


def run_study_demo(*, work: Path, out: Path, rounds: int, epsilon: float,
                   statistics_epsilon: float, seed: int = 0) -> dict[str, Any]:
    """Run the study demo (module docstring); returns and writes ``out/summary.json``.

    ``statistics_epsilon`` is the part of each site's ``epsilon`` the statistics phase
    spends (the rest goes to DP-SGD). ``seed`` is the run's seed (the initial model; each
    site draws its DP noise from its own secret and fresh entropy whatever the seed) and
    the local-only and pooled baselines' (``bench/study_demo.py`` repeats it over seeds).
    """
    t_start = time.monotonic()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    coord_cli = str(BIN / "fedward-coordinator")
    spec_file = work / "heart_disease_uci.yaml"   # the copy the ML team sends every site
    shutil.copyfile(EXAMPLES / "heart_disease_uci.yaml", spec_file)
    spec = load_spec(spec_file)

    console.rule("[bold]1. Data: four hospitals' files, their own columns and codes")
    files: dict[str, str] = json.loads(_run([sys.executable, "-m",
                                             "site_agent.study_demo_data", str(work / "data")]))
    for name, path in files.items():
        console.print(f"  {name}: {path}")

    console.rule("[bold]2. Coordinator and the study")
    home = work / "coordinator"
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}/api/v1"
    # Ports of its own (the gateway's default, 9092, may be another coordinator's).
    env = dict(os.environ, FEDWARD_HOME=str(home), FEDWARD_API_PORT=str(api_port),
               FEDWARD_FLEET_PORT=str(free_port()), FEDWARD_METRICS_PORT="0")
    _run([coord_cli, "init", "--home", str(home)], env=env)
    procs = Procs()
    try:
        coord = procs.start("coordinator", [coord_cli, "serve", "--home", str(home)],
                            work / "coordinator.log", env=env)
        _wait_http(f"{api}/health", 60, coord, work / "coordinator.log")
        # The first registration loads torch and Opacus into the API (its DP check).
        study = json.loads(_run([coord_cli, "study", "register", str(spec_file), "--json"],
                                timeout=300, env=env))
        console.print(f"  study {study['ref']} registered: sha256 {study['hash']}")

        console.rule("[bold]3. Sites: enroll by token, check the mapping, approve, start")
        _enroll_sites(work=work, home=home, env=env, files=files, spec_file=spec_file,
                      procs=procs)
        online = _wait_online(home, len(files), 120)
        console.print(f"  {online}/{len(files)} sites connected")

        console.rule(f"[bold]4. Statistics phase and {rounds} DP rounds, epsilon {epsilon} "
                     "per site in total")
        run = json.loads(_run([coord_cli, "launch", "--project", PROJECT, "--study",
                               study["ref"], "--rounds", str(rounds), "--epsilon",
                               str(epsilon), "--min-sites", str(len(files)),
                               "--round-deadline", "120", "--statistics",
                               "--statistics-epsilon", str(statistics_epsilon),
                               "--seed", str(seed), "--json"],
                              env=env))
        run_id = int(run["id"])
        subprocess.run([coord_cli, "watch", str(run_id), "--timeout", "900"], env=env,
                       timeout=960, check=False)
        detail = json.loads(_run([coord_cli, "rounds", str(run_id), "--json"], env=env))
        if detail["run"]["status"] != "completed":
            raise RuntimeError(f"run {run_id} {detail['run']['status']}: "
                               f"{detail['run'].get('failure_reason')}; see {work}")
        admin = {"Authorization": f"Bearer {(home / 'admin.token').read_text().strip()}"}
        stats = httpx.get(f"{api}/runs/{run_id}/statistics", headers=admin, timeout=30).json()

        console.rule("[bold]5. Evaluation on each site's held-out split")
        evaluation = _evaluate(work=work, home=home, run_id=run_id, detail=detail,
                               stats=stats, files=files, spec_file=spec_file)
        served = evaluation["served_record"]

        console.rule("[bold]6. Release: propose, gates, approval by a second person")
        release = _release_and_clinician(
            api=api, home=home, run_id=run_id, work=work, procs=procs,
            instances=[served["encoded"]], labels=[served["raw"][_label_column()]],
            intended_use=_USE, with_classes=True, records=[served["named"]])
    finally:
        procs.stop_all()

    summary = _summary(spec=spec, study=study, run_id=run_id, detail=detail, stats=stats,
                       evaluation=evaluation, release=release, epsilon=epsilon)
    summary["seed"] = seed
    summary["demo_seconds"] = time.monotonic() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _print(summary, out)
    return summary


def _label_column() -> str:
    """The label's column in the first site's file (Cleveland's mapping names it)."""
    mapping = json.loads((EXAMPLES / "mapping-cleveland.json").read_text())
    return str(mapping["label"]["column"])


def _evaluate(*, work: Path, home: Path, run_id: int, detail: dict[str, Any],
              stats: dict[str, Any], files: dict[str, str], spec_file: Path
              ) -> dict[str, Any]:
    config = detail["run"]["config"]
    ckpts = sorted((home / "checkpoints" / f"run-{run_id}").glob("round-*.safetensors"),
                   key=lambda p: int(p.stem.split("-")[1]))
    reference = work / "reference_statistics.json"
    reference.write_text(json.dumps(stats["reference"]))
    share = stats.get("epsilon")
    job = {"study": str(spec_file), "checkpoint": str(ckpts[-1]), "reference": str(reference),
           "work": str(work),
           "sites": [{"name": n, "data": p, "mapping": str(EXAMPLES / f"mapping-{n}.json")}
                     for n, p in files.items()],
           "settings": {k: config.get(k) for k in ("epsilon", "delta", "rounds",
                                                   "local_epochs", "lr", "batch_size",
                                                   "max_grad_norm", "seed")}
           | {"statistics_epsilon": share}}
    (work / "evaluation-job.json").write_text(json.dumps(job, indent=2))
    _run([sys.executable, "-m", "site_agent.study_demo_eval", str(work / "evaluation-job.json"),
          str(work / "evaluation.json")], timeout=900)
    result: dict[str, Any] = json.loads((work / "evaluation.json").read_text())
    return result


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _summary(*, spec: Any, study: dict[str, Any], run_id: int, detail: dict[str, Any],
             stats: dict[str, Any], evaluation: dict[str, Any], release: dict[str, Any],
             epsilon: float) -> dict[str, Any]:
    last: dict[str, dict[str, float]] = {}
    for rnd in detail["metrics"].get("rounds", []):
        for site, values in rnd["sites"].items():
            last.setdefault(site, {}).update(values)
    per_site = evaluation["sites"]
    sites = []
    for name, ev in per_site.items():
        spent = last.get(name, {}).get("epsilon-spent")
        sites.append({
            "name": name, "n_train": ev["n_train"], "n_test": ev["n_test"],
            "epsilon_spent": spent, "epsilon_budget": epsilon,
            "federated": {"accuracy": ev["federated"]["accuracy"],
                          "auc": ev["federated"]["auc"]},
            "local_only": {"accuracy": ev["local_only"]["accuracy"],
                           "auc": ev["local_only"]["auc"],
                           "epsilon_spent": ev["local_only"]["epsilon_spent"],
                           "trained": "in the demo process, from the site's file"},
            "pooled": {"accuracy": ev["pooled"]["accuracy"], "auc": ev["pooled"]["auc"]}})
    completed = [r for r in detail["rounds"] if r["status"] == "completed"]
    prediction = release.get("prediction") or {}
    classes = prediction.get("classes") or []
    served = evaluation["served_record"]
    return {
        "study": {"name": spec.name, "ref": study["ref"], "hash": study["hash"],
                  "n_features": len(spec.input_columns())},
        "run_id": run_id,
        "rounds": len(completed),
        "delta": detail["run"]["config"].get("delta"),
        "statistics_epsilon": stats.get("epsilon"),
        "sites": sites,
        "mean_site_accuracy": {
            "federated": _mean([s["federated"]["accuracy"] for s in sites]),
            "local_only": _mean([s["local_only"]["accuracy"] for s in sites]),
            "pooled": _mean([s["pooled"]["accuracy"] for s in sites])},
        "mean_site_auc": {
            "federated": _mean([s["federated"]["auc"] for s in sites]),
            "local_only": _mean([s["local_only"]["auc"] for s in sites]),
            "pooled": _mean([s["pooled"]["auc"] for s in sites])},
        "baselines": {
            "local_only": "DP-SGD on the site's own training rows at the run's epsilon and "
                          "delta (statistics included); computed by the demo from the "
                          "sites' public files: at a real site it would run at the site",
            "pooled": {**evaluation["pooled"],
                       "note": "every site's training rows together, no DP: possible only "
                               "because this data set is public"}},
        "round_seconds": [float(r["seconds"]) for r in completed
                          if r.get("seconds") is not None],
        "statistics_seconds": stats.get("seconds"),
        "release": {
            "id": release.get("id"), "candidate_id": release.get("candidate_id"),
            "verified": bool(release.get("verified")),
            "served_prediction": classes[0] if classes else None,
            "served_record": {"site": served["site"], "raw": served["raw"],
                              "named": served["named"], "encoded": served["encoded"],
                              "sent_as": "both: by the study's field names (records) and "
                                         "as the model's input columns (instances; null "
                                         "where the model imputes)"},
            "served_by_name": prediction.get("by_name")},
    }


def _print(s: dict[str, Any], out: Path) -> None:
    t = Table(title="Held-out accuracy / AUC per site (epsilon per site)")
    for c in ("site", "train", "test", "epsilon spent", "federated", "local-only DP",
              "pooled, no DP"):
        t.add_column(c)

    def fig(m: dict[str, Any]) -> str:
        auc = "-" if m["auc"] is None else f"{m['auc']:.3f}"
        return f"{m['accuracy']:.3f} / {auc}"

    for site in s["sites"]:
        eps = site["epsilon_spent"]
        t.add_row(site["name"], str(site["n_train"]), str(site["n_test"]),
                  "-" if eps is None else f"{eps:.3f} of {site['epsilon_budget']:g}",
                  fig(site["federated"]), fig(site["local_only"]), fig(site["pooled"]))
    console.print(t)
    m = s["mean_site_accuracy"]
    console.print(f"mean site accuracy: federated {m['federated']:.3f}, local-only "
                  f"{m['local_only']:.3f}, pooled {m['pooled']:.3f}")
    rs = ", ".join(f"{x:.2f}" for x in s["round_seconds"])
    console.print(f"statistics phase {s['statistics_seconds']} s; round seconds: {rs}")
    r = s["release"]
    by_name = r.get("served_by_name") or {}
    console.print(f"release {r['id']} verified {r['verified']}; served "
                  f"{r['served_record']['site']}'s first row -> {r['served_prediction']} "
                  f"(by field name: {by_name.get('classes')}, same answer: "
                  f"{by_name.get('agrees')})")
    console.print(f"demo took {s['demo_seconds']:.0f} s; summary in {out / 'summary.json'}")


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@cli.command()
def demo_study(
    work: Annotated[Path, typer.Option(help="scratch folder (wiped)")] = Path(
        ".fedward-demo-study"),
    out: Annotated[Path, typer.Option()] = Path("demo-output/study"),
    rounds: Annotated[int, typer.Option()] = 5,
    epsilon: Annotated[float, typer.Option(help="per site, statistics included")] = 3.0,
    # A few hundred rows per site: at the default share (0.3 x epsilon) the noisy sums put
    # the imputation values and the scaling's centres far from the data (seen at the range
    # edges); half the budget, the most a run allows, keeps them near it.
    statistics_epsilon: Annotated[float, typer.Option(
        help="the part of epsilon the statistics phase spends")] = 1.5,
    seed: Annotated[int, typer.Option(help="the run's seed (initial model, baselines)")] = 0,
) -> None:
    """Run the study demo on the UCI Heart Disease data of four hospitals."""
    summary = run_study_demo(work=work.resolve(), out=out.resolve(), rounds=rounds,
                             epsilon=epsilon, statistics_epsilon=statistics_epsilon,
                             seed=seed)
    if not summary["release"]["verified"]:
        raise typer.Exit(1)


def main() -> None:
    """Console entry point."""
    cli()


if __name__ == "__main__":
    main()
