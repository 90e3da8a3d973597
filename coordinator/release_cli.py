"""``fedward-coordinator release ...``: the release workflow from the command line.

Every command talks to the coordinator's REST API with the caller's token, like the rest of
``fedward-coordinator``; the roles the API enforces apply (see docs/ml-team-guide.md).
``download`` also fetches the public key and the revocation list and verifies the bundle
before it says anything is usable.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt

if TYPE_CHECKING:
    from coordinator.cli import ApiClient

__all__ = ["release_app"]

release_app = typer.Typer(help="Release candidates, approval, signed bundles, revocation.",
                          no_args_is_help=True, pretty_exceptions_enable=False,
                          add_completion=False)
console = Console()
err_console = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the API's answer as JSON.")]
ReasonOpt = Annotated[str, typer.Option("--reason", help="Why (kept in the audit log).")]


def _client(api: str | None, token: str | None, home: Path | None) -> ApiClient:
    from coordinator.cli import _client as make_client

    return make_client(api, token, home)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


def _gates_table(candidate: dict[str, Any]) -> Table:
    table = Table("gate", "result", "reason",
                  title=f"candidate {candidate['id']} · run {candidate['run_id']} round "
                        f"{candidate['round']} · {candidate['status']}")
    for gate in candidate["gates"]:
        table.add_row(gate["name"], "passed" if gate["passed"] else "[red]failed[/]",
                      gate["reason"])
    return table


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
    """Propose a run's checkpoint as a release candidate and wait for its gates."""
    body: dict[str, Any] = {"run_id": run_id, "intended_use": intended_use}
    if round_number is not None:
        body["round"] = round_number
    client = _client(api, token, home)
    # Answered at once (202); the gates run on the coordinator while we poll.
    cand = client.call("POST", "/candidates?wait=false", body)
    deadline = time.monotonic() + timeout
    while cand["status"] == "evaluating":
        if time.monotonic() > deadline:
            _fail(f"candidate {cand['id']} is still being evaluated after {timeout:.0f} s; "
                  f"check it later with `fedward-coordinator release candidates`")
        time.sleep(1.0)
        cand = client.call("GET", f"/candidates/{cand['id']}")
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
    table = Table("release", "task", "approved by", "created", "revoked")
    for r in rows:
        table.add_row(r["release_id"], r["task"], str(r["approved_by"]), r["created_at"][:16],
                      f"{r['revoked_at'][:16]}: {r['revoke_reason']}" if r["revoked_at"] else "")
    console.print(table)


@release_app.command()
def revoke(release_id: str, reason: ReasonOpt, home: HomeOpt = None, api: ApiOpt = None,
           token: TokenOpt = None) -> None:
    """Revoke a release (admins): the portal drops it and verification refuses it."""
    _client(api, token, home).call("POST", f"/releases/{release_id}/revoke", {"reason": reason})
    console.print(f"release [bold]{release_id}[/] revoked")


@release_app.command()
def gates(project: str,
          min_site_auc: Annotated[float | None, typer.Option(help="Per-site minimum AUC.")] = None,
          min_site_accuracy: Annotated[float | None, typer.Option(
              help="Per-site minimum accuracy.")] = None,
          home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
    """Set a project's per-site minimum metrics (reviewers and admins); omitted: none."""
    out = _client(api, token, home).call("PUT", f"/projects/{project}/gates", {
        "min_site_auc": min_site_auc, "min_site_accuracy": min_site_accuracy})
    console.print(f"gates of [bold]{project}[/]: {out['thresholds'] or 'no thresholds set'}")


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
        _fail(f"GET {path} -> {response.status_code}: {detail}")
    return response.content


def _unpack(archive: bytes, release_id: str, out: Path) -> Path:
    """Unpack into ``out``; refuse anything but plain files under ``<release_id>/``."""
    target = out / release_id
    if target.exists():
        _fail(f"{target} exists; remove it or choose another --out")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar.getmembers():
            inside = member.name == release_id or member.name.startswith(release_id + "/")
            if not inside or not (member.isfile() or member.isdir()):
                _fail(f"the archive holds an unexpected entry {member.name!r}; not unpacked")
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
    from export.bundle import BundleVerificationError, public_key_fingerprint, verify_bundle
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
        _fail(f"verification failed: {err}. Do not use this bundle.")
        return
    fingerprint = public_key_fingerprint(public_key.read_bytes())
    console.print(f"verified: release {verified.release_id}, {len(verified.files)} files, in "
                  f"{folder}")
    console.print(f"release key fingerprint {fingerprint}: compare it with the one your "
                  "release administrator published")
