"""``fedward-coordinator init``, ``admin-token`` and ``serve``: the commands of the coordinator
host itself.

They act on the data directory (``--home``) directly, not through the REST API: create it
with the site CA, the database schema and the first admin; renew the admin's API token;
run the coordinator (SuperLink, gateway and REST API) on it.
"""

from __future__ import annotations

import logging
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from coordinator.cli_client import ADMIN_TOKEN_FILE, fail, settings_for
from coordinator.cli_options import HomeOpt
from fedward.files import atomic_write
from fedward.roles import ADMIN

__all__ = ["add_host_commands", "admin_token", "init", "serve"]

console = Console()


def add_host_commands(app: typer.Typer) -> None:
    """Declare ``init``, ``admin-token`` and ``serve`` on ``fedward-coordinator``'s app."""
    app.command()(init)
    app.command("admin-token")(admin_token)
    app.command()(serve)


def init(home: HomeOpt = None,
         admin: Annotated[str, typer.Option(help="name of the first admin account")] = "admin"
         ) -> None:
    """Create the data directory, the site CA, the database schema and the first admin."""
    from sqlmodel import select

    from coordinator.auth import create_user
    from coordinator.db import make_engine, session_scope
    from coordinator.home import init_home
    from coordinator.models import User

    settings = settings_for(home)
    pki = init_home(settings)
    engine = make_engine(settings.effective_database_url)
    token_file = settings.home / ADMIN_TOKEN_FILE
    with session_scope(engine) as session:
        if session.exec(select(User).where(User.name == admin)).first() is None:
            _user, token = create_user(session, name=admin, role=ADMIN,
                                       token_ttl=timedelta(days=settings.token_ttl_days))
            _write_token_file(token_file, token)
            console.print(f"admin account [bold]{admin}[/] created; its API token is in "
                          f"{token_file} (mode 0600, valid {settings.token_ttl_days} days: "
                          "renew it with `fedward-coordinator admin-token`)")
    engine.dispose()
    console.print(f"coordinator initialised in {settings.home}")
    console.print(f"site CA certificate: {pki.ca_cert} (sites get it with their enrollment "
                  "token, which pins it: `fedward-coordinator enroll-token SITE`)")


def _write_token_file(path: Path, token: str) -> None:
    atomic_write(path, token + "\n", mode=0o600)


def admin_token(home: HomeOpt = None,
                admin: Annotated[str, typer.Option(help="the admin account")] = "admin") -> None:
    """Issue the admin a new API token, directly in the database, into the admin token file.

    For the coordinator host only (it needs the data directory): when the admin's token
    expired or was revoked, or to rotate it. The previous token stops working.
    """
    from sqlmodel import select

    from coordinator.db import make_engine, session_scope
    from coordinator.models import User
    from coordinator.users_api import issue_api_token

    settings = settings_for(home)
    if not (settings.home / "pki").exists():
        fail(f"{settings.home} is not a coordinator data directory; give --home or set "
              "FEDWARD_HOME (run `fedward-coordinator init` first on a new host)")
    engine = make_engine(settings.effective_database_url)
    try:
        with session_scope(engine) as session:
            user = session.exec(select(User).where(User.name == admin)).first()
            if user is None or user.role != ADMIN:
                fail(f"no admin account named {admin!r}; give its name with --admin")
            assert user is not None
            if user.disabled_at is not None:
                fail(f"admin {admin!r} is disabled; another admin can enable it "
                      f"(`fedward-coordinator enable-user {admin}`)")
            token = issue_api_token(session, user, actor="local:admin-token",
                                    ttl=timedelta(days=settings.token_ttl_days))
            expires = user.token_expires_at
    finally:
        engine.dispose()
    token_file = settings.home / ADMIN_TOKEN_FILE
    _write_token_file(token_file, token)
    console.print(f"new API token for [bold]{admin}[/] in {token_file} (mode 0600), valid "
                  f"until {expires:%Y-%m-%d %H:%M} UTC; the previous one no longer works")


def serve(home: HomeOpt = None,
          port: Annotated[int | None, typer.Option(help="REST API port")] = None,
          superlink_port: Annotated[int, typer.Option(
              help="SuperLink port on 127.0.0.1 inside its private network namespace "
                   "(0: pick one); the coordinator reaches it through run/superlink.sock")
          ] = 0,
          fleet_port: Annotated[int | None, typer.Option(
              help="site gateway port (the one port sites connect to)")] = None) -> None:
    """Run the coordinator: SuperLink (private namespace), gateway and REST API, until
    Ctrl-C/SIGTERM."""
    from coordinator.metrics import SWITCH_INTERVAL_S
    from coordinator.service import Coordinator

    # force: an import on the way (Opacus, through the privacy accounting) configures the
    # root logger itself, which would make this a no-op and the coordinator's log silent.
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per SuperLink call
    # Process-wide, like the logging above: short GIL hand-overs keep a /metrics scrape
    # from queuing behind the API's busy threads (coordinator.metrics.SWITCH_INTERVAL_S).
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    settings = settings_for(home)
    if port is not None:
        settings = settings.model_copy(update={"api_port": port})
    if fleet_port is not None:
        settings = settings.model_copy(update={"fleet_port": fleet_port})
    from coordinator.ports import opened_ports, port_problem
    from coordinator.superlink import SuperLinkError

    clash = port_problem(opened_ports(settings, superlink_port=superlink_port,
                                      mode=settings.flower_isolation))
    if clash is not None:
        fail(clash)
    try:
        Coordinator(settings=settings, superlink_port=superlink_port).serve()
    except SuperLinkError as err:
        fail(f"the Flower SuperLink could not start: {err}")
