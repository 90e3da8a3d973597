"""``fedward-coordinator add-site``, ``enroll-token``, ``sites`` and ``revoke-site``: the sites
of the federation, through the REST API."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Column, Table

from coordinator.cli_client import ApiClient, fail
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt

__all__ = ["add_site_commands"]

console = Console()


def add_site_commands(
        app: typer.Typer,
        api_client: Callable[[str | None, str | None, Path | None], ApiClient]) -> None:
    """Declare the site commands on ``fedward-coordinator``'s app.

    Args:
        app: ``fedward-coordinator``'s Typer app.
        api_client: Makes the REST client from ``--api``, ``--token`` and ``--home``.
    """

    @app.command("add-site")
    def add_site(name: str,
                 node_key: Annotated[Path | None, typer.Option(
                     "--node-key", help="the site's node public key file (node_key.pub)")] = None,
                 home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
        """Add a site and, with --node-key, register its Flower node key."""
        client = api_client(api, token, home)
        existing = {s["name"] for s in client.call("GET", "/sites")}
        if name not in existing:
            client.call("POST", "/sites", {"name": name})
        if node_key is not None:
            if not node_key.exists():
                fail(f"{node_key} does not exist; copy node_key.pub from the site's keys folder")
            site = client.call("POST", f"/sites/{name}/node-key",
                               {"public_key": node_key.read_text().strip()})
            console.print(f"site [bold]{name}[/] registered "
                          f"(Flower node {site.get('flower_node_id')})")
        else:
            console.print(f"site [bold]{name}[/] added; register its node key with --node-key")


    @app.command("enroll-token")
    def enroll_token(name: str, home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
                     as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """Add the site if new and issue its one-time enrollment token (valid 24 h)."""
        client = api_client(api, token, home)
        if name not in {s["name"] for s in client.call("GET", "/sites")}:
            client.call("POST", "/sites", {"name": name})
        out = client.call("POST", f"/sites/{name}/enrollment-token")
        if as_json:
            print(json.dumps(out))
            return
        console.print(f"enrollment token for [bold]{name}[/] (one use, expires "
                      f"{out['expires_at'][:16]} UTC):")
        print(out["token"])
        console.print("send it to the site's IT with the fleet address "
                      f"[bold]{out['fleet_address']}[/]; they run:\n  fedward-site enroll "
                      f"--dir DIR --gateway {out['fleet_address']} --token TOKEN")


    @app.command()
    def sites(home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """List the sites: status (added, registered, revoked), online or not and when the
        gateway last heard from it, the Fedward and Flower versions its agent reported, when its
        certificate expires, Flower node, registration time."""
        client = api_client(api, token, home)
        rows = client.call("GET", "/sites")
        if as_json:
            print(json.dumps(rows))
            return
        table = Table("name", "status", "online", "last seen (UTC)", "Flower node", "registered",
                      "added")
        for s in rows:
            table.add_row(s["name"], s["status"], "online" if s.get("online") else "offline",
                          str(s.get("last_seen_at") or "never")[:19].replace("T", " "),
                          str(s.get("flower_node_id") or ""),
                          str(s.get("registered_at") or "")[:19], str(s.get("created_at", ""))[:19])
        console.print(table)
        # A second table: one table with every column would not fit 80 columns.
        versions = Table("name", Column("Fedward", overflow="fold"),
                         Column("Flower", overflow="fold"), "reported (UTC)",
                         "certificate expires")
        for s in rows:
            versions.add_row(s["name"], str(s.get("agent_version") or "-"),
                             str(s.get("flower_version") or "-"),
                             f"{str(s.get('versions_at'))[:16].replace('T', ' ')} at "
                             f"{s.get('versions_via')}" if s.get("versions_at") else "never",
                             str(s["certificate_expires_at"])[:10]
                             if s.get("certificate_expires_at") else "no valid certificate")
        console.print(versions)


    @app.command("revoke-site")
    def revoke_site(name: str,
                    reason: Annotated[str, typer.Option(help="why (kept in the audit log)")],
                    home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
        """Revoke a site: its certificates stop working at the gateway at once."""
        client = api_client(api, token, home)
        client.call("POST", f"/sites/{name}/revoke", {"reason": reason})
        console.print(f"site [bold]{name}[/] revoked")
