"""``fedward-demo``: one real federated DP run end to end, on this machine.

It plays every role with the real command-line tools, each site agent in its own process
with its own data directory, node key and CSV partition:

1. writes a non-IID split of scikit-learn's Breast Cancer Wisconsin data for three hospitals
   (``fedward-site demo-data``), keeping a global test set aside;
2. initialises and starts the coordinator (SuperLink on 127.0.0.1 with TLS and node auth);
3. sets up each site (``init``, ``keygen``, ``add-site --node-key``) and starts its agent;
4. launches a 5-round DP run with an epsilon budget of 3 per site and shows live progress;
5. evaluates the final global model and a pooled non-private baseline (same training rows,
   same model) on the global test set, prints a table and writes
   ``demo-output/summary.json``; then stops every process it started.

``--version`` prints the Fedward version and the commit it was built from, then exits.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import numpy as np
import typer
from rich.console import Console
from rich.table import Table

import fedward
from fedward.flower.control import FlowerControl
from fedward.procs import die_with_parent, free_port

__all__ = ["main"]

console = Console()
BIN = Path(sys.executable).parent


_DEMO_USE = ("Demonstration only: breast-mass malignancy from FNA features; not for "
             "patient care.")


def _read_csv(path: Path, label: str) -> tuple[np.ndarray, np.ndarray]:
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        li = header.index(label)
        rows = [r for r in reader if r]
    x = np.array([[float(v) for i, v in enumerate(r) if i != li] for r in rows], np.float32)
    y = np.array([int(float(r[li])) for r in rows], np.int64)
    return x, y


@dataclass
class Procs:
    """Every background process the demo started, stopped by PID at the end."""

    items: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        fh = log.open("wb")
        # Every process dies with the demo, even if the demo itself is killed.
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, preexec_fn=die_with_parent)
        fh.close()
        self.items.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _name, proc in reversed(self.items):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for _name, proc in reversed(self.items):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _run(argv: list[str], timeout: float = 120, **kw: Any) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                         **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed ({res.returncode}):\n{res.stderr}"
                           f"{res.stdout}")
    return str(res.stdout)


def _wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early; see {log}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s; see {log}")


def _release_and_clinician(*, api: str, home: Path, run_id: int, work: Path, procs: Procs,
                           instances: list[list[float | None]], labels: list[Any],
                           intended_use: str = _DEMO_USE, with_classes: bool = False,
                           records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Propose the final model, let the gates run, approve as a second person, then play
    the clinician: download, verify, serve, predict ``instances`` (the model's input rows;
    ``labels``: their true labels, shown beside; ``with_classes``: keep the predicted
    class names in the summary too; ``records``: the same patients by field name, asked
    too, the answer kept as ``prediction.by_name``). Returns the summary's ``release``."""
    admin = httpx.Client(base_url=api, timeout=60, headers={
        "Authorization": f"Bearer {(home / 'admin.token').read_text().strip()}"})

    def user(name: str, role: str) -> httpx.Client:
        r = admin.post("/users", json={"name": name, "role": role,
                                       "password": f"demo-{name}-password"})
        r.raise_for_status()
        return httpx.Client(base_url=api, timeout=60,
                            headers={"Authorization": f"Bearer {r.json()['token']}"})

    ml, reviewer, clinician = (user("alice", "ml_engineer"), user("bob", "reviewer"),
                               user("carol", "clinician"))
    r = ml.post("/candidates", params={"wait": "false"}, json={
        "run_id": run_id,
        "intended_use": intended_use})
    r.raise_for_status()
    cand_id = int(r.json()["id"])
    console.print(f"  alice (ML team) proposed candidate {cand_id}; gates running "
                  "(exports, parity measured at each site, privacy statement)...")
    deadline = time.monotonic() + 600
    cand = r.json()
    while cand["status"] == "evaluating" and time.monotonic() < deadline:
        time.sleep(1.0)
        cand = ml.get(f"/candidates/{cand_id}").json()
    for gate in cand["gates"]:
        console.print(f"  gate {gate['name']}: {'pass' if gate['passed'] else 'FAIL'} - "
                      f"{gate['reason'][:110]}")
    parity: dict[str, Any] = next(
        (g["figures"] for g in cand["gates"] if g["name"] == "export_parity"), {})
    formats: dict[str, dict[str, float]] = {}
    for by_fmt in (parity or {}).get("per_site", {}).values():
        for fmt, fig in by_fmt.items():
            worst = formats.setdefault(fmt, {"max_abs_diff": 0.0, "agreement": 1.0})
            worst["max_abs_diff"] = max(worst["max_abs_diff"], float(fig["max_abs_diff"]))
            worst["agreement"] = min(worst["agreement"], float(fig["agreement"]))
    audits = (parity or {}).get("membership_inference", {})
    mia_aucs = [float(a["auc"]) for a in audits.values() if a.get("auc") is not None]
    out: dict[str, Any] = {"candidate_id": cand_id, "candidate_status": cand["status"],
                           "formats": formats, "verified": False,
                           # Each site's membership-inference audit of the candidate.
                           "membership_inference": {
                               "max_site_auc": max(mia_aucs) if mia_aucs else None,
                               "sites": audits}}
    for site, audit in sorted(audits.items()):
        console.print(f"  membership audit at {site}: attack AUC {audit.get('auc')}, "
                      f"empirical epsilon >= {audit.get('epsilon_lower_bound')}")
    if cand["status"] != "awaiting_review":
        console.print(f"  [red]candidate {cand['status']}: not approved[/]")
        return out
    selfish = ml.post(f"/candidates/{cand_id}/approve", json={"reason": "my own"})
    console.print(f"  alice approving her own candidate -> {selfish.status_code} (refused)")
    r = reviewer.post(f"/candidates/{cand_id}/approve",
                      json={"reason": "gates pass; intended use is demonstration only"})
    r.raise_for_status()
    release_id = r.json()["release_id"]
    console.print(f"  bob (reviewer) approved: release [bold]{release_id}[/] signed")

    console.rule("[bold]7. Clinician: download, verify, serve, predict")
    listed = [x["release_id"] for x in clinician.get("/releases").json()]
    if release_id not in listed:
        raise RuntimeError("the approved release is not listed for clinicians")
    cdir = work / "clinician"
    cdir.mkdir(parents=True, exist_ok=True)
    archive = cdir / "bundle.tar.gz"
    archive.write_bytes(clinician.get(f"/releases/{release_id}/bundle").content)
    (cdir / "release-key.pem").write_bytes(httpx.get(f"{api}/release-key.pem").content)
    (cdir / "revocations.json").write_bytes(httpx.get(f"{api}/revocations").content)
    with tarfile.open(archive) as tar:
        tar.extractall(cdir / "bundle", filter="data")
    bundle = next(p for p in (cdir / "bundle").iterdir() if p.is_dir())
    verify = subprocess.run([str(BIN / "fedward-verify"), str(bundle), "--public-key",
                             str(cdir / "release-key.pem"), "--revocations",
                             str(cdir / "revocations.json")],
                            capture_output=True, text=True, timeout=120, check=False)
    console.print(f"  fedward-verify: {verify.stdout.strip() or verify.stderr.strip()}")
    out.update(id=release_id, bundle_path=str(bundle),
               public_key_path=str(cdir / "release-key.pem"), verified=verify.returncode == 0)
    if verify.returncode != 0:
        return out
    port = free_port()
    serve = procs.start("inference", [str(BIN / "fedward-serve"), "--bundle", str(bundle),
                                      "--public-key", str(cdir / "release-key.pem"),
                                      "--revocations", str(cdir / "revocations.json"),
                                      "--port", str(port)], work / "inference.log")
    _wait_http(f"http://127.0.0.1:{port}/health", 60, serve, work / "inference.log")
    pred = httpx.post(f"http://127.0.0.1:{port}/predict",
                      json={"instances": instances}, timeout=30).json()
    out["prediction"] = {"release_id": pred.get("release_id"),
                         "predictions": pred.get("predictions"), "labels": labels}
    if with_classes:
        out["prediction"]["classes"] = pred.get("classes")
    if records is not None:
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"records": records},
                       timeout=30)
        named = r.json()
        out["prediction"]["by_name"] = {
            "status": r.status_code, "classes": named.get("classes"),
            "probabilities": named.get("probabilities"),
            "detail": named.get("detail"),
            # The same patients, by field name and as encoded rows: the same answer.
            "agrees": (r.status_code == 200
                       and named.get("predictions") == pred.get("predictions")
                       and all(abs(a - b) < 1e-6 for ra, rb in zip(
                           named.get("probabilities") or [], pred.get("probabilities") or [],
                           strict=True) for a, b in zip(ra, rb, strict=True)))}
        console.print(f"  by field name {records[0]}: {r.status_code}, predicted "
                      f"{named.get('classes')} with probabilities "
                      f"{named.get('probabilities')}")
    console.print(f"  inference service (release {pred.get('release_id')}): predicted "
                  f"{pred.get('classes') if with_classes else pred.get('predictions')} for "
                  f"{len(instances)} test rows, true {labels}")
    return out


def run_demo(*, work: Path, out: Path, rounds: int, epsilon: float, local_epochs: int,
             n_sites: int, stock_results: Path | None) -> dict[str, Any]:
    from safetensors.numpy import load_file

    from fedward.models import set_model_arrays
    from fedward.tasks import build_model, get_task
    from privacy import evaluate, train_plain

    task = "breast_cancer_mlp"
    spec = get_task(task)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    site_cli, coord_cli = str(BIN / "fedward-site"), str(BIN / "fedward-coordinator")

    console.rule("[bold]1. Data: a non-IID split for three hospitals (nothing downloaded)")
    fed = json.loads(_run([site_cli, "demo-data", "--out", str(work / "data"), "--task", task,
                           "--sites", str(n_sites)]))
    for s in fed["sites"]:
        console.print(f"  {s['name']}: {s['rows']} rows -> {s['csv']}")

    console.rule("[bold]2. Coordinator")
    home = work / "coordinator"
    api_port = free_port()
    env = dict(os.environ, FEDWARD_HOME=str(home), FEDWARD_API_PORT=str(api_port))
    _run([coord_cli, "init", "--home", str(home)], env=env)
    procs = Procs()
    try:
        coord = procs.start("coordinator", [coord_cli, "serve", "--home", str(home)],
                            work / "coordinator.log", env=env)
        _wait_http(f"http://127.0.0.1:{api_port}/api/v1/health", 60, coord,
                   work / "coordinator.log")
        superlink = (home / "superlink.address").read_text().strip()
        console.print(f"  API http://127.0.0.1:{api_port}/docs · SuperLink {superlink} (TLS, "
                      "node auth, private namespace)")

        console.rule("[bold]3. Sites: init, keygen, register, start")
        for s in fed["sites"]:
            d = work / "sites" / s["name"]
            _run([site_cli, "init", "--dir", str(d), "--name", s["name"], "--project", "demo",
                  "--superlink",
                  superlink, "--ca-cert", str(home / "pki" / "ca.pem"), "--data", s["csv"],
                  "--schema", s["schema"]])
            _run([site_cli, "keygen", "--dir", str(d)])
            _run([coord_cli, "add-site", s["name"], "--node-key",
                  str(d / "keys" / "node_key.pub")], env=env)
            procs.start(f"site {s['name']}", [site_cli, "start", "--dir", str(d)],
                        work / f"site-{s['name']}.log")
            console.print(f"  {s['name']}: agent started, node key registered")

        # Like any operator, wait until the sites show as connected before launching, so
        # that round 1 measures a round and not the sites' start-up.
        control = FlowerControl(address=superlink, ca_cert=home / "pki" / "ca.pem")
        deadline = time.monotonic() + 90
        while len(control.online_node_ids()) < n_sites and time.monotonic() < deadline:
            time.sleep(0.5)
        console.print(f"  {len(control.online_node_ids())}/{n_sites} sites connected")

        console.rule(f"[bold]4. Federated DP run: {rounds} rounds, epsilon budget {epsilon} "
                     "per site")
        run = json.loads(_run([coord_cli, "launch", "--project", "demo", "--task", task,
                               "--rounds", str(rounds), "--local-epochs", str(local_epochs),
                               "--epsilon", str(epsilon), "--delta", "1e-5",
                               "--min-sites", "2", "--round-deadline", "90", "--json"],
                              env=env))
        run_id = int(run["id"])
        subprocess.run([coord_cli, "watch", str(run_id), "--timeout", "600"], env=env,
                       timeout=660, check=False)
        detail = json.loads(_run([coord_cli, "rounds", str(run_id), "--json"], env=env))
        release: dict[str, Any] | None = None
        if detail["run"]["status"] == "completed":
            console.rule("[bold]6. Release: propose, gates, approval by a second person, "
                         "signing")
            x, y = _read_csv(Path(fed["test_csv"]), spec.label_column)
            release = _release_and_clinician(
                api=f"http://127.0.0.1:{api_port}/api/v1", home=home, run_id=run_id,
                work=work, procs=procs, instances=x[:5].tolist(), labels=y[:5].tolist())
    finally:
        procs.stop_all()

    run_info, rnds, metrics = detail["run"], detail["rounds"], detail["metrics"]
    completed = [r for r in rnds if r["status"] == "completed"]
    last_metrics: dict[str, dict[str, float]] = {}
    for rnd in metrics.get("rounds", []):
        for site_name, values in rnd["sites"].items():
            last_metrics.setdefault(site_name, {}).update(values)

    console.rule("[bold]5. Evaluation on the global test set")
    test_x, test_y = _read_csv(Path(fed["test_csv"]), spec.label_column)
    fed_result: dict[str, float] = {}
    ckpt_dir = home / "checkpoints" / f"run-{run_id}"
    ckpts = sorted(ckpt_dir.glob("round-*.safetensors"))
    if ckpts:
        model = build_model(task, seed=0)
        set_model_arrays(model, dict(load_file(str(ckpts[-1]))))
        r = evaluate(model=model, features=test_x, labels=test_y)
        fed_result = {"test_auc": r.auc, "test_accuracy": r.accuracy, "test_loss": r.loss}
    pooled_x, pooled_y = _read_csv(Path(fed["pooled_csv"]), spec.label_column)
    # The baseline gets every advantage: all training rows in one place, no noise, no
    # clipping, and Adam (which the non-private model prefers), for as many epochs as
    # the federated run trained in total.
    baseline = build_model(task, seed=0)
    train_plain(model=baseline, features=pooled_x, labels=pooled_y,
                batch_size=spec.default_batch_size, epochs=rounds * local_epochs, lr=0.01,
                seed=0, optimizer="adam")
    b = evaluate(model=baseline, features=test_x, labels=test_y)

    round_seconds = [float(r["seconds"]) for r in completed if r.get("seconds") is not None]
    stock: dict[str, Any] | None = None
    if stock_results is not None and stock_results.exists():
        raw = json.loads(stock_results.read_text())
        stock = {"median_round_seconds": raw.get("median_round_seconds"),
                 "sites": raw.get("sites"), "source": str(stock_results)}
    median = float(np.median(round_seconds)) if round_seconds else None
    summary: dict[str, Any] = {
        "task": task,
        "run_id": run_id,
        "run_status": run_info["status"],
        "failure_reason": run_info.get("failure_reason"),
        "rounds_planned": rounds,
        "rounds_completed": len(completed),
        "local_epochs": local_epochs,
        "delta": 1e-5,
        "sites": [
            {
                "name": s["name"],
                "epsilon_spent": last_metrics.get(s["name"], {}).get("epsilon-spent"),
                "epsilon_budget": epsilon,
                "n_train": int(last_metrics.get(s["name"], {}).get("num-examples", 0)),
                "n_rows": s["rows"],
                "final_eval_auc": last_metrics.get(s["name"], {}).get("final-eval-auc"),
            }
            for s in fed["sites"]
        ],
        "federated": fed_result,
        "pooled_baseline": {"test_auc": b.auc, "test_accuracy": b.accuracy,
                            "test_loss": b.loss, "private": False},
        "auc_gap": (b.auc - fed_result["test_auc"]) if fed_result else None,
        "round_seconds": round_seconds,
        "median_round_seconds": median,
        "stock_flower": stock,
        "speedup_vs_stock": (stock["median_round_seconds"] / median
                             if stock and median and stock.get("median_round_seconds") else None),
        "test_rows": len(test_y),
        "release": release,
        "demo_seconds": time.monotonic() - t_start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary)
    return summary


def _print_summary(s: dict[str, Any]) -> None:
    t = Table(title="Per site")
    for c in ("site", "rows", "n_train", "epsilon spent", "budget", "final held-out AUC"):
        t.add_column(c)
    for site in s["sites"]:
        eps = site["epsilon_spent"]
        auc = site["final_eval_auc"]
        t.add_row(site["name"], str(site["n_rows"]), str(site["n_train"]),
                  "-" if eps is None else f"{eps:.3f}", f"{site['epsilon_budget']:.1f}",
                  "-" if auc is None else f"{auc:.3f}")
    console.print(t)
    m = Table(title="Global test set")
    for c in ("model", "AUC", "accuracy"):
        m.add_column(c)
    f = s["federated"]
    if f:
        m.add_row("federated, DP", f"{f['test_auc']:.4f}", f"{f['test_accuracy']:.4f}")
    p = s["pooled_baseline"]
    m.add_row("pooled, no DP (baseline)", f"{p['test_auc']:.4f}", f"{p['test_accuracy']:.4f}")
    console.print(m)
    rs = ", ".join(f"{x:.2f}" for x in s["round_seconds"])
    console.print(f"round seconds: {rs} (median {s['median_round_seconds'] or 0:.2f})")
    if s["stock_flower"]:
        console.print(f"stock Flower FedAvg app, same machine kind (bench): median "
                      f"{s['stock_flower']['median_round_seconds']:.2f} s per round "
                      f"-> {s['speedup_vs_stock']:.1f}x")
    console.print(f"run {s['run_status']}; {s['rounds_completed']}/{s['rounds_planned']} rounds; "
                  f"demo took {s['demo_seconds']:.0f} s; summary in demo-output/summary.json")


cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _print_version(value: bool) -> None:
    if value:
        print(fedward.version_line("fedward-demo"))
        raise typer.Exit()


@cli.command()
def demo(
    work: Annotated[Path, typer.Option(help="scratch folder (wiped)")] = Path(".fedward-demo"),
    out: Annotated[Path, typer.Option()] = Path("demo-output"),
    rounds: Annotated[int, typer.Option()] = 5,
    local_epochs: Annotated[int, typer.Option()] = 3,
    epsilon: Annotated[float, typer.Option()] = 3.0,
    sites: Annotated[int, typer.Option()] = 3,
    stock_results: Annotated[Path | None, typer.Option()] = Path(
        "bench/results/stock_round_time_3sites.json"),
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version,
        help="print the version and the commit it was built from, then exit")] = False,
) -> None:
    """Run the end-to-end demo."""
    summary = run_demo(work=work.resolve(), out=out.resolve(), rounds=rounds, epsilon=epsilon,
                       local_epochs=local_epochs, n_sites=sites, stock_results=stock_results)
    if summary["run_status"] != "completed":
        raise typer.Exit(1)


def main() -> None:
    """Console entry point."""
    cli()
