"""``fedward-coordinator release ...``: the release workflow from the command line.

Every command talks to the coordinator's REST API with the caller's token, like the rest of
``fedward-coordinator``; the roles the API enforces apply (see docs/ml-team-guide.md).
``download`` also fetches the public key and the revocation list and verifies the bundle
before it says anything is usable.

Tables never cut an id or a reason: ids and gate names keep their full width and reasons
wrap between words, whatever the terminal's width; ``--json`` prints the API's answer.
Progress (``propose``) goes to stderr, so ``--json`` output on stdout stays parseable.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table

from coordinator.cli_client import ApiClient, api_client, fail
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt
from coordinator.cli_tables import id_column, text_column

__all__ = ["release_app"]

release_app = typer.Typer(help="Release candidates, approval, signed bundles, revocation.",
                          no_args_is_help=True, pretty_exceptions_enable=False,
                          add_completion=False)
console = Console()
err_console = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's answer as JSON.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (kept in the audit log).")]


def _client(api: str | None, token: str | None, home: Path | None) -> ApiClient:
    return api_client(api, token, home)


def _gates_table(candidate: dict[str, Any]) -> Table:
    names = [g["name"] for g in candidate["gates"]]
    table = Table(id_column("gate", names), Column("result", no_wrap=True),
                  text_column("reason"),
                  title=f"candidate {candidate['id']} · run {candidate['run_id']} round "
                        f"{candidate['round']} · {candidate['status']}", expand=True)
    for gate in candidate["gates"]:
        table.add_row(gate["name"], "passed" if gate["passed"] else "[red]failed[/]",
                      gate["reason"])
    return table


# What each gate does while it runs, for the progress of `propose`.
_RUNNING: dict[str, str] = {
    "site_participation": "counting the rounds each site trained in",
    "export": "exporting ONNX, ONNX Runtime INT8 and OpenVINO (seconds)",
    "site_metrics": "checking each site's held-out metrics against the project's minimums",
    "export_parity": "each site compares the exports with the model on its held-out data "
                     "(up to the sites' round deadline)",
    "privacy_statement": "checking each site's reported epsilon against the run's budget",
}
_STILL_RUNNING_EVERY_S = 10.0


def _parity_lines(gate: dict[str, Any]) -> list[str]:
    """One line per site with the parity figures it reported."""
    per_site = (gate.get("figures") or {}).get("per_site") or {}
    return [f"      {site}: " + "; ".join(
        f"{fmt} agreement {f['agreement']:.2f}, max diff {f['max_abs_diff']:.0e}"
        for fmt, f in formats.items()) for site, formats in sorted(per_site.items())]


def _wait_for_gates(client: ApiClient, cand: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Poll the candidate until its gates have run, printing each gate as it starts and ends."""
    # Imported here, not at the top: release_gates loads the database layer and FastAPI,
    # which would slow every fedward-coordinator command down by most of a second.
    from coordinator.release_gates import GATE_ORDER

    started = time.monotonic()
    err_console.print(f"candidate {cand['id']} (run {cand['run_id']}, round {cand['round']}): "
                      f"running {len(GATE_ORDER)} gates", soft_wrap=True)
    shown: set[str] = set()
    running: str | None = None
    noted = started
    while True:
        elapsed = time.monotonic() - started
        for gate in cand["gates"]:
            if gate["name"] in shown:
                continue
            shown.add(gate["name"])
            mark = "passed" if gate["passed"] else "[red]FAILED[/]"
            err_console.print(f"  {gate['name']}: {mark} at {elapsed:.0f} s: {gate['reason']}",
                              soft_wrap=True, highlight=False)
            if gate["name"] == "export_parity":
                for line in _parity_lines(gate):
                    err_console.print(line, soft_wrap=True, highlight=False)
        if cand["status"] != "evaluating":
            return cand
        now = time.monotonic()
        current = cand.get("running_gate")
        if current and current != running:
            running, noted = current, now
            err_console.print(f"  {current}: running, {_RUNNING.get(current, 'please wait')}",
                              soft_wrap=True, highlight=False)
        elif running and now - noted >= _STILL_RUNNING_EVERY_S:
            noted = now
            err_console.print(f"  {running}: still running ({elapsed:.0f} s)", highlight=False)
        if now - started > timeout:
            fail(f"candidate {cand['id']} is still being evaluated after {timeout:.0f} s; "
                  f"check it later with `fedward-coordinator release candidates`")
        time.sleep(1.0)
        cand = client.call("GET", f"/candidates/{cand['id']}")


@release_app.command()
def propose(run_id: int,
            intended_use: Annotated[str, typer.Option(
                "--intended-use", help="What the model is for and what not (on the model "
                                       "card clinicians read).")],
            round_number: Annotated[int | None, typer.Option(
                "--round", help="The checkpoint's round (default: the run's last).")] = None,
            timeout: Annotated[float, typer.Option(
                help="Seconds to wait for the gates (the sites' parity can take "
                     "minutes).")] = 900.0,
            home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
            as_json: JsonOpt = False) -> None:
    """Propose a run's checkpoint as a release candidate and wait for its gates.

    Each gate is reported on stderr as it starts and ends (parity with each site's figures).
    """
    body: dict[str, Any] = {"run_id": run_id, "intended_use": intended_use}
    if round_number is not None:
        body["round"] = round_number
    client = _client(api, token, home)
    # Answered at once (202); the gates run on the coordinator while we poll.
    cand = _wait_for_gates(client, client.call("POST", "/candidates?wait=false", body), timeout)
    if as_json:
        print(json.dumps(cand))
        return
    console.print(_gates_table(cand))
    if cand["status"] == "awaiting_review":
        console.print(f"candidate [bold]{cand['id']}[/] awaits review: a reviewer who is not "
                      f"you runs `fedward-coordinator release approve {cand['id']} --reason ...`")
    else:
        raise typer.Exit(2)


@release_app.command()
def candidates(status: Annotated[str | None, typer.Option(help="Only this status.")] = None,
               home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
               as_json: JsonOpt = False) -> None:
    """List release candidates and their gates."""
    path = "/candidates" + (f"?status={status}" if status else "")
    rows = _client(api, token, home).call("GET", path)
    if as_json:
        print(json.dumps(rows))
        return
    for cand in rows:
        console.print(_gates_table(cand))


@release_app.command()
def approve(candidate_id: int, reason: ReasonOpt, home: HomeOpt = None, api: ApiOpt = None,
            token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Approve a candidate (not your own): the coordinator signs and publishes its bundle."""
    release = _client(api, token, home).call("POST", f"/candidates/{candidate_id}/approve",
                                             {"reason": reason})
    if as_json:
        print(json.dumps(release))
        return
    console.print(f"release [bold]{release['release_id']}[/] published, signed with key "
                  f"{release['key_fingerprint']}")


@release_app.command()
def reject(candidate_id: int, reason: ReasonOpt, home: HomeOpt = None, api: ApiOpt = None,
           token: TokenOpt = None) -> None:
    """Reject a candidate (not your own) with a reason."""
    _client(api, token, home).call("POST", f"/candidates/{candidate_id}/reject",
                                   {"reason": reason})
    console.print(f"candidate [bold]{candidate_id}[/] rejected")


@release_app.command("list")
def list_releases(include_revoked: Annotated[bool, typer.Option(
                      "--all", help="Also revoked releases (not for clinicians).")] = False,
                  home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
                  as_json: JsonOpt = False) -> None:
    """List releases (approved; revoked ones too with --all)."""
    rows = _client(api, token, home).call(
        "GET", "/releases" + ("?include_revoked=true" if include_revoked else ""))
    if as_json:
        print(json.dumps(rows))
        return
    if not rows:
        console.print("no release yet" if include_revoked else "no current release (--all "
                      "also lists revoked ones)")
        return
    table = Table(id_column("release", [r["release_id"] for r in rows]),
                  text_column("approved"), text_column("status"), expand=True)
    for r in rows:
        status = (f"[red]revoked[/] {r['revoked_at'][:16].replace('T', ' ')} by "
                  f"{r['revoked_by']}: {r['revoke_reason']}" if r["revoked_at"] else "current")
        table.add_row(f"{r['release_id']}\n[dim]{r['task']}[/]",
                      f"{r['created_at'][:16].replace('T', ' ')} by {r['approved_by']}: "
                      f"{r['approval_reason']}", status)
    console.print(table)


@release_app.command()
def revoke(release_id: str, reason: ReasonOpt, home: HomeOpt = None, api: ApiOpt = None,
           token: TokenOpt = None) -> None:
    """Revoke a release (admins): the portal drops it and verification refuses it."""
    _client(api, token, home).call("POST", f"/releases/{release_id}/revoke", {"reason": reason})
    console.print(f"release [bold]{release_id}[/] revoked")


@release_app.command()
def gates(project: str,
          min_sites: Annotated[int | None, typer.Option(
              help="Sites that must have contributed (default 2, or all of a run's sites "
                   "if fewer).")] = None,
          min_round_share: Annotated[float | None, typer.Option(
              help="Share of the completed rounds a site must have trained in to count "
                   "(default 0.5).")] = None,
          min_site_auc: Annotated[float | None, typer.Option(
              help="Held-out AUC every site must reach.")] = None,
          min_site_accuracy: Annotated[float | None, typer.Option(
              help="Held-out accuracy every site must reach.")] = None,
          clear: Annotated[list[str] | None, typer.Option(
              "--clear", help="Unset this threshold (its default applies again); "
                              "repeatable.")] = None,
          home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
          as_json: JsonOpt = False) -> None:
    """Show a project's release gate thresholds; with options, change those named.

    Without options nothing changes. Each option sets one threshold and keeps the others
    (reviewers and admins); --clear NAME unsets one.
    """
    from coordinator.release_gates import THRESHOLD_HELP  # as in _wait_for_gates

    changes: dict[str, float | int | None] = {
        k: v for k, v in (("min_sites", min_sites), ("min_round_share", min_round_share),
                          ("min_site_auc", min_site_auc),
                          ("min_site_accuracy", min_site_accuracy)) if v is not None}
    for name in clear or []:
        if name not in THRESHOLD_HELP:
            fail(f"--clear {name}: no such threshold (known: {', '.join(THRESHOLD_HELP)})")
        if name in changes:
            fail(f"--clear {name} and --{name.replace('_', '-')} contradict each other")
        changes[name] = None
    client = _client(api, token, home)
    path = f"/projects/{project}/gates"
    out = client.call("PATCH", path, changes) if changes else client.call("GET", path)
    if as_json:
        print(json.dumps(out))
        return
    names = list(THRESHOLD_HELP)
    table = Table(id_column("threshold", names), Column("in force", no_wrap=True),
                  text_column("meaning"), expand=True,
                  title=f"release gates of project {project}" + (" (changed)" if changes
                                                                 else ""))
    for name in names:
        if name in out["thresholds"]:
            value = f"{out['thresholds'][name]:g}"
        elif name in out["defaults"]:
            value = f"{out['defaults'][name]:g} (default)"
        else:
            value = "not set"
        table.add_row(name, value, out["help"].get(name, ""))
    console.print(table)
    if not changes:
        console.print("Change one with e.g. --min-sites 3, unset one with --clear NAME "
                      "(reviewers and admins).", highlight=False)


@release_app.command()
def lineage(run_id: int, round_number: int, home: HomeOpt = None, api: ApiOpt = None,
            token: TokenOpt = None) -> None:
    """Print a model version's lineage as JSON."""
    print(json.dumps(_client(api, token, home).call(
        "GET", f"/versions/{run_id}/{round_number}/lineage"), indent=2))


def _get_bytes(client: ApiClient, path: str) -> bytes:
    # ApiClient.call decodes JSON; the archive and the key are bytes.
    response = client._http.get(path)
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        fail(f"GET {path} -> {response.status_code}: {detail}")
    return response.content


def _unpack(archive: bytes, release_id: str, out: Path) -> Path:
    """Unpack into ``out``; refuse anything but plain files under ``<release_id>/``."""
    target = out / release_id
    if target.exists():
        fail(f"{target} exists; remove it or choose another --out")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar.getmembers():
            inside = member.name == release_id or member.name.startswith(release_id + "/")
            if not inside or not (member.isfile() or member.isdir()):
                fail(f"the archive holds an unexpected entry {member.name!r}; not unpacked")
        # filter="data" also refuses absolute paths, '..' and links.
        tar.extractall(out, filter="data")
    return target


@release_app.command()
def download(release_id: str,
             out: Annotated[Path, typer.Option("--out", help="Folder to put the bundle, key "
                                               "and revocation list in.")] = Path("."),
             public_key: Annotated[Path | None, typer.Option(
                 "--public-key", help="Verify with this release key (PEM) instead of the one "
                                      "the coordinator serves.")] = None,
             home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
    """Download a release, its public key and the revocation list, unpack and verify it."""
    from export.bundle_format import BundleVerificationError
    from export.bundle_keys import public_key_fingerprint
    from export.bundle_verify import verify_bundle
    from export.revocations import load_revocations

    client = _client(api, token, home)
    out.mkdir(parents=True, exist_ok=True)
    archive = _get_bytes(client, f"/releases/{release_id}/bundle")
    (out / f"{release_id}.tar.gz").write_bytes(archive)
    if public_key is None:
        public_key = out / "release.pub.pem"
        public_key.write_bytes(_get_bytes(client, "/release-key.pem"))
    revocations = out / "revocations.json"
    revocations.write_bytes(_get_bytes(client, "/revocations"))
    folder = _unpack(archive, release_id, out)
    try:
        listed = load_revocations(revocations, public_key=public_key)
        verified = verify_bundle(bundle_dir=folder, public_key=public_key,
                                 revoked=listed.revoked, release_id=release_id)
    except BundleVerificationError as err:
        fail(f"verification failed: {err}. Do not use this bundle.")
        return
    fingerprint = public_key_fingerprint(public_key.read_bytes())
    console.print(f"verified: release {verified.release_id}, {len(verified.files)} files, in "
                  f"{folder}")
    console.print(f"release key fingerprint {fingerprint}: compare it with the one your "
                  "release administrator published")
