"""Round time of a STOCK Flower deployment (Flower's own FedAvg app), for side-by-side reporting.

Starts, on 127.0.0.1 only: one SuperLink (TLS on, SuperNode auth on, SQLite state, runtime
dependency installation off) and N SuperNodes (each with its own ECDSA P-384 key, registered
through the control API, and its own data partition of the Breast Cancer Wisconsin data set),
then runs ``bench/stock_flower`` with ``flwr run`` and reads the per-round timestamps the
ServerApp writes.

    .venv/bin/python bench/stock_round_time.py --sites 3 --rounds 3 --json /tmp/stock.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VENV_BIN, Proc, flwr_env, free_port, run_cmd, wait_until

APP_DIR = Path(__file__).resolve().parent / "stock_flower"
CONN = "bench"


# ---------------------------------------------------------------------------------------------
# Certificates, keys, data


def make_tls(d: Path) -> tuple[Path, Path, Path]:
    """Self-signed CA and a server certificate for 127.0.0.1/localhost. Returns (ca, crt, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedward-bench CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    srv_key = ec.generate_private_key(ec.SECP384R1())
    srv = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    ca_p, crt_p, key_p = d / "ca.crt", d / "server.pem", d / "server.key"
    ca_p.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    crt_p.write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    key_p.write_bytes(srv_key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    key_p.chmod(0o600)
    return ca_p, crt_p, key_p


def make_node_key(path: Path) -> None:
    r = run_cmd(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", path.name,
                 "-f", str(path)], env={"PATH": "/usr/bin:/bin"}, timeout_s=30)
    if r.returncode != 0:
        raise RuntimeError(f"ssh-keygen failed: {r.stderr}")


def make_partitions(d: Path, n: int) -> list[Path]:
    """Split load_breast_cancer by index into n CSVs (30 raw features, then the label)."""
    import numpy as np
    from sklearn.datasets import load_breast_cancer

    from fedward.tasks import BREAST_CANCER_COLUMNS

    x, y = load_breast_cancer(return_X_y=True)
    header = ",".join([*BREAST_CANCER_COLUMNS, "diagnosis"])
    paths = []
    for i, idx in enumerate(np.array_split(np.arange(len(y)), n)):
        p = d / f"site{i}.csv"
        np.savetxt(p, np.column_stack([x[idx], y[idx]]), delimiter=",", header=header,
                   comments="", fmt="%.10g")
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------
# Flower CLI helpers


def write_cli_config(flwr_home: Path, port: int, ca: Path) -> Path:
    """$FLWR_HOME/config.toml for the `flwr` CLI (flwr 1.42 format)."""
    cfg = flwr_home / "config.toml"
    cfg.write_text(
        "[superlink]\n"
        f'default = "{CONN}"\n\n'
        f"[superlink.{CONN}]\n"
        f'address = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n',
        encoding="utf-8",
    )
    return cfg


def flwr_json(args: list[str], env: dict[str, str], timeout_s: float = 60) -> dict[str, Any]:
    """Run `flwr ... --format json` and return the JSON object it prints."""
    r = run_cmd([str(VENV_BIN / "flwr"), *args, "--format", "json"], env=env, timeout_s=timeout_s)
    out = r.stdout.strip()
    start = out.find("{")
    if start < 0:
        raise RuntimeError(f"flwr {' '.join(args)} rc={r.returncode}: {out}\n{r.stderr}")
    data: dict[str, Any] = json.loads(out[start:])
    if not data.get("success", False):
        raise RuntimeError(f"flwr {' '.join(args)} failed: {data}")
    return data


def superlink_healthy(port: int, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/health", context=ctx,
                                    timeout=2) as resp:
            return bool(resp.status == 200)
    except Exception:
        return False


# ---------------------------------------------------------------------------------------------


def run_stock(*, sites: int, rounds: int, tmp: Path, data_paths: list[Path] | None = None,
              local_epochs: int = 1, probe_unregistered: bool = False,
              env_extra: dict[str, str] | None = None,
              extra_lifetime_s: float = 0.0) -> dict[str, Any]:
    """Run the stock app once: ``sites`` SuperNodes, ``rounds`` rounds; return the figures.

    Every process it starts lives under ``tmp`` (logs, state, keys) with a bounded lifetime
    and is stopped by its PID before this returns; removing ``tmp`` is the caller's job.
    ``data_paths`` are the sites' CSV partitions (features, then the label last, with a
    header); without them the data set is split by index. ``env_extra`` goes into every
    Flower process's environment (e.g. ``OMP_NUM_THREADS``). Raises on any failure, with
    the error also in the result (``error``) the exception carries as ``.result``.
    ``extra_lifetime_s`` lengthens that lifetime (a machine loaded far beyond its cores).
    """
    if sites < 1 or rounds < 1:
        raise ValueError("sites and rounds must be >= 1")
    # Bounded lifetime of every process: generous for the measured run, never unbounded.
    lifetime = 180 + 90 * rounds * max(1, sites // 2) + int(extra_lifetime_s)
    procs: list[Proc] = []
    result: dict[str, Any] = {"sites": sites, "rounds": rounds, "local_epochs": local_epochs,
                              "tmp": str(tmp)}

    def env_for(home: Path) -> dict[str, str]:
        return flwr_env(home, env_extra)

    try:
        t_setup = time.monotonic()
        ca, crt, key = make_tls(tmp)
        if data_paths is None:
            data_paths = make_partitions(tmp, sites)
        if len(data_paths) != sites:
            raise ValueError(f"{len(data_paths)} data partitions for {sites} sites")
        result["data_paths"] = [str(p) for p in data_paths]
        keys = []
        for i in range(sites):
            k = tmp / f"site{i}_key"
            make_node_key(k)
            keys.append(k)
        result["setup_seconds"] = time.monotonic() - t_setup

        port = free_port()
        link_env = env_for(tmp / "home_superlink")
        cli_home = tmp / "home_cli"
        cli_env = env_for(cli_home)
        write_cli_config(cli_home, port, ca)

        # --- SuperLink -------------------------------------------------------------------
        t0 = time.monotonic()
        link = Proc("superlink", [
            str(VENV_BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(crt), "--ssl-keyfile", str(key),
            "--enable-supernode-auth", "--database", str(tmp / "state.db"),
            "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ], link_env, tmp / "superlink.log", lifetime, cwd=tmp)
        procs.append(link)

        def link_up() -> bool:
            if link.poll() is not None:
                raise RuntimeError(f"SuperLink exited {link.poll()}:\n{link.log_tail()}")
            return superlink_healthy(port, ca)

        wait_until(link_up, 60, what="SuperLink /health")
        result["superlink_start_seconds"] = time.monotonic() - t0

        # --- register node keys (control API, via the CLI) -----------------------------------
        t0 = time.monotonic()
        node_ids = []
        for i, k in enumerate(keys):
            data = flwr_json(["supernode", "register", str(k) + ".pub", CONN, "--name",
                              f"site{i}"], cli_env)
            node_ids.append(str(data["node-id"]))
        result["register_seconds_total"] = time.monotonic() - t0

        # --- optional: unregistered key ------------------------------------------------------
        if probe_unregistered:
            k = tmp / "rogue_key"
            make_node_key(k)
            t0 = time.monotonic()
            rogue = Proc("rogue", [
                str(VENV_BIN / "flower-supernode"), "--root-certificates", str(ca),
                "--superlink", f"127.0.0.1:{port}", "--auth-supernode-private-key", str(k),
                "--port", str(free_port()),
            ], env_for(tmp / "home_rogue"), tmp / "rogue.log", 60, cwd=tmp)
            procs.append(rogue)
            try:
                wait_until(lambda: rogue.poll() is not None, 55, what="rogue SuperNode exit")
            except TimeoutError:
                pass
            code = rogue.poll()
            # `timeout` returns the child's own exit code when it exits by itself.
            result["unregistered_probe"] = {
                "exit_code": code, "seconds": time.monotonic() - t0,
                "log_tail": rogue.log_tail(6),
            }

        # --- SuperNodes ------------------------------------------------------------------------
        t0 = time.monotonic()
        for i in range(sites):
            node = Proc(f"supernode{i}", [
                str(VENV_BIN / "flower-supernode"), "--root-certificates", str(ca),
                "--superlink", f"127.0.0.1:{port}", "--auth-supernode-private-key", str(keys[i]),
                "--node-config", f"data-path='{data_paths[i]}'",
                "--port", str(free_port()),
            ], env_for(tmp / f"home_site{i}"), tmp / f"supernode{i}.log", lifetime, cwd=tmp)
            procs.append(node)

        def all_online() -> bool:
            for p in procs:
                if p.name.startswith("supernode") and p.poll() is not None:
                    raise RuntimeError(f"{p.name} exited {p.poll()}:\n{p.log_tail()}")
            nodes = flwr_json(["supernode", "ls", CONN], cli_env)["nodes"]
            online = {n["node-id"] for n in nodes if n["status"] == "online"}
            return set(node_ids) <= online

        wait_until(all_online, 60 + 15 * sites, interval_s=0.5, what="all SuperNodes online")
        result["supernodes_online_seconds"] = time.monotonic() - t0

        # --- the run -----------------------------------------------------------------------
        timing_path = tmp / "timing.json"
        t0 = time.monotonic()
        started = flwr_json([
            "run", str(APP_DIR), CONN, "--run-config",
            f"num-server-rounds={rounds} min-nodes={sites} local-epochs={local_epochs} "
            f"timing-path='{timing_path}'",
        ], cli_env)
        run_id = started["run-id"]
        result["run_id"] = run_id
        result["flwr_run_cli_seconds"] = time.monotonic() - t0

        ls_failures: list[str] = []
        result["status_poll_failures"] = ls_failures

        def finished() -> dict[str, Any] | None:
            for p in procs:
                if p.name != "rogue" and p.poll() is not None:
                    raise RuntimeError(f"{p.name} exited {p.poll()}:\n{p.log_tail()}")
            try:
                runs = flwr_json(["ls", CONN, "--run-id", run_id], cli_env)["runs"]
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                # On a machine loaded far beyond its cores the CLI's connection check can
                # time out once in a while: a status poll, not the run, failed. The next poll
                # decides; ``wait_until``'s limit still bounds the wait.
                ls_failures.append(str(err)[:300])
                if len(ls_failures) > 20:
                    raise
                return None
            status = runs[0]["status"] if runs else ""
            return runs[0] if status.startswith("finished") else None

        run_row = wait_until(finished, lifetime - 60, interval_s=1.0, what=f"run {run_id}")
        result["run_wall_seconds"] = time.monotonic() - t0
        result["run_status"] = run_row["status"]
        result["run_status_details"] = run_row.get("status-details")
        if not run_row["status"].endswith("completed") or not timing_path.exists():
            raise RuntimeError(f"run ended {run_row['status']}: {run_row.get('status-details')}"
                               f"\n{link.log_tail(30)}")

        timing = json.loads(timing_path.read_text())
        round_s = [r["seconds"] for r in timing["rounds"]]
        result.update({
            "median_round_seconds": statistics.median(round_s),
            "round_seconds": round_s,
            "total_rounds_seconds": sum(round_s),
            "strategy_seconds": timing["strategy_seconds"],
            "rounds_detail": timing["rounds"],
            "train_metrics": timing["train_metrics"],
            "evaluate_metrics": timing["evaluate_metrics"],
        })
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        raise StockRunError(result["error"], result) from exc
    finally:
        for p in reversed(procs):
            p.stop()
    return result


class StockRunError(RuntimeError):
    """The stock run failed; ``result`` holds what was measured up to the failure."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    ap.add_argument("--probe-unregistered", action="store_true",
                    help="also start a SuperNode with an unregistered key; record its exit")
    args = ap.parse_args()
    if args.sites < 1 or args.rounds < 1:
        ap.error("--sites and --rounds must be >= 1")

    import benchutil as bu  # provenance: commit, dirty flag, load at start and end

    bu.mark_start()
    tmp = Path(tempfile.mkdtemp(prefix="stockflwr-"))
    rc = 1
    try:
        result = run_stock(sites=args.sites, rounds=args.rounds, tmp=tmp,
                           local_epochs=args.local_epochs,
                           probe_unregistered=args.probe_unregistered)
        rc = 0
    except StockRunError as exc:
        result = exc.result
        print(result["error"], file=sys.stderr)
    finally:
        if not args.keep and rc == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"logs kept in {tmp}", file=sys.stderr)
    if args.json:
        result["provenance"] = bu.provenance()
        args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")

    summary = {k: result.get(k) for k in ("sites", "rounds", "median_round_seconds",
                                           "round_seconds", "total_rounds_seconds",
                                           "superlink_start_seconds",
                                           "supernodes_online_seconds", "error")}
    print(json.dumps(summary, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
