"""``fedward-coordinator create-user``, ``users``, ``new-token``, ``revoke-tokens``,
``disable-user``, ``enable-user`` and ``delete-user``: the coordinator's accounts and their
API tokens, through the REST API (the roles it enforces apply)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from coordinator.cli_client import ApiClient
from coordinator.cli_options import ApiOpt, HomeOpt, TokenOpt

__all__ = ["add_user_commands"]

console = Console()


def add_user_commands(
        app: typer.Typer,
        api_client: Callable[[str | None, str | None, Path | None], ApiClient]) -> None:
    """Declare the user and token commands on ``fedward-coordinator``'s app.

    Args:
        app: ``fedward-coordinator``'s Typer app.
        api_client: Makes the REST client from ``--api``, ``--token`` and ``--home``.
    """

    @app.command("create-user")
    def create_user_cmd(
        name: str,
        role: Annotated[str, typer.Option(help="admin, ml_engineer, reviewer or clinician")],
        password: Annotated[str | None, typer.Option(
            help="password for the release portal and POST /login (asked if omitted)")] = None,
        no_password: Annotated[bool, typer.Option(
            "--no-password", help="a token-only account (scripts, services)")] = False,
        home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
    ) -> None:
        """Create a user (admins); prints its API token once."""
        if password is None and not no_password:
            password = typer.prompt("password (12 characters or more)", hide_input=True,
                                    confirmation_prompt=True)
        body: dict[str, Any] = {"name": name, "role": role}
        if not no_password:
            body["password"] = password
        out = api_client(api, token, home).call("POST", "/users", body)
        console.print(f"user [bold]{name}[/] ({role}) created; its API token, shown only now:")
        print(out["token"])


    @app.command()
    def users(home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
        """List the users (admins): role, when the API token expires, disabled or not."""
        rows = api_client(api, token, home).call("GET", "/users")
        if as_json:
            print(json.dumps(rows))
            return
        table = Table("name", "role", "API token", "state")
        for u in rows:
            expires = f"expires {str(u['token_expires_at'])[:16]}"
            table.add_row(u["name"], u["role"], "revoked" if u["token_revoked"] else expires,
                          f"disabled since {str(u['disabled_at'])[:16]}" if u.get("disabled_at")
                          else "enabled")
        console.print(table)


    @app.command("new-token")
    def new_token(name: str, home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None
                  ) -> None:
        """Issue a user a new API token (admins for anyone, a user for themself); the old one
        stops working. Prints the token once."""
        out = api_client(api, token, home).call("POST", f"/users/{name}/token")
        console.print(f"new API token for [bold]{name}[/], valid until "
                      f"{str(out['expires_at'])[:16]} UTC, shown only now:")
        print(out["token"])


    @app.command("revoke-tokens")
    def revoke_tokens(name: str, home: HomeOpt = None, api: ApiOpt = None,
                      token: TokenOpt = None) -> None:
        """Revoke a user's API token and end all its login sessions (admins for anyone, a user
        for themself)."""
        api_client(api, token, home).call("POST", f"/users/{name}/revoke-tokens")
        console.print(f"every token of [bold]{name}[/] is revoked; `fedward-coordinator new-token "
                      f"{name}` issues a new one")


    @app.command("disable-user")
    def disable_user(name: str,
                     reason: Annotated[str, typer.Option(help="why (kept in the audit log)")],
                     home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
        """Disable a user (admins): no login and no token of theirs works until enabled."""
        api_client(api, token, home).call("POST", f"/users/{name}/disable", {"reason": reason})
        console.print(f"user [bold]{name}[/] disabled")


    @app.command("enable-user")
    def enable_user(name: str, home: HomeOpt = None, api: ApiOpt = None,
                    token: TokenOpt = None) -> None:
        """Enable a disabled user again (admins); its old tokens stay revoked."""
        api_client(api, token, home).call("POST", f"/users/{name}/enable")
        console.print(f"user [bold]{name}[/] enabled; it logs in with its password, or "
                      f"`fedward-coordinator new-token {name}` gives it an API token")


    @app.command("delete-user")
    def delete_user(name: str,
                    yes: Annotated[bool, typer.Option(
                        "--yes", help="do not ask to confirm")] = False,
                    home: HomeOpt = None, api: ApiOpt = None, token: TokenOpt = None) -> None:
        """Delete a user (admins): account, password and sessions. The audit log keeps what it
        did."""
        if not yes and not typer.confirm(f"delete user {name}?"):
            raise typer.Exit(1)
        api_client(api, token, home).call("DELETE", f"/users/{name}")
        console.print(f"user [bold]{name}[/] deleted")
