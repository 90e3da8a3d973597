"""The coordinator CLI's REST client: one readable message for every HTTP failure.

Shared by ``fedward-coordinator`` and its command groups (``release``, ``mlflow``, ``study``,
run control), so that none of them needs the CLI module that assembles them.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, Protocol

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from coordinator.settings import Settings, SettingsError, load_settings

__all__ = ["ADMIN_TOKEN_FILE", "Api", "ApiClient", "ClientFactory", "CoordinatorUnreachable",
           "api_client", "fail", "settings_for"]

ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105 - a file name, not a secret
err_console = Console(stderr=True)


def settings_for(home: Path | None) -> Settings:
    """The coordinator's settings for a ``--home`` option (None: the default home); a bad
    ``FEDWARD_*`` variable is one error line and exit status 2, not a traceback."""
    try:
        return load_settings(home.expanduser().resolve() if home else None)
    except SettingsError as err:
        fail(str(err), code=2)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` as one error line and exit with ``code``."""
    # soft_wrap: one line, greppable; escape: a name in brackets is text, not markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


class Api(Protocol):
    """What a command needs of the REST client (:class:`ApiClient`, or a test's stand-in)."""

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any: ...


# Makes the REST client from a command's ``--api``, ``--token`` and ``--home``.
ClientFactory = Callable[[str | None, str | None, Path | None], Api]


class CoordinatorUnreachable(Exception):
    """The coordinator's API could not be reached (the message says how it failed).

    Attributes:
        refused: no connection could be made at all (nothing listens there).
    """

    def __init__(self, message: str, *, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


class ApiClient:
    """A thin REST client that turns HTTP errors into one readable message."""

    def __init__(self, base: str, token: str | None, *, token_source: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base = base.rstrip("/")
        # Where the token came from, for the 401 message: a reader who forgot --home after
        # `init --home` must learn which file was looked at and how to point elsewhere.
        self.token_source = token_source
        self._http = httpx.Client(base_url=self.base + "/api/v1", headers=headers, timeout=30)
        # Closed with the client object: a command run in a longer-lived process (a test, a
        # script importing the CLI) leaves no connection open behind it.
        weakref.finalize(self, self._http.close)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
             timeout: float | None = None) -> Any:
        """One request; ``timeout`` (seconds) replaces the client's 30 s for a call that
        makes the coordinator wait on another service (an MLflow hand-off)."""
        try:
            return self.call_or_raise(method, path, body, timeout=timeout)
        except CoordinatorUnreachable as err:
            if err.refused:
                fail(f"the coordinator API at {self.base} is not reachable; is "
                      "`fedward-coordinator serve` running?")
            fail(f"the coordinator API at {self.base} did not answer {method} {path} "
                  f"({err}); try again, and check `fedward-coordinator serve`'s log")

    def call_or_raise(self, method: str, path: str, body: dict[str, Any] | None = None, *,
                      timeout: float | None = None) -> Any:
        """Like :meth:`call`, but raises :class:`CoordinatorUnreachable` when the API cannot
        be reached (not running, restarting, a connection cut mid-answer)."""
        try:
            r = self._http.request(method, path, json=body,
                                   timeout=httpx.USE_CLIENT_DEFAULT if timeout is None
                                   else timeout)
        except httpx.TransportError as err:
            raise CoordinatorUnreachable(
                f"{type(err).__name__}: {err}" if str(err) else type(err).__name__,
                refused=isinstance(err, httpx.ConnectError)) from None
        if r.status_code >= 400:
            try:
                detail = r.json()
                msg = detail.get("message") or detail.get("detail")
            except ValueError:
                msg = r.text
            if r.status_code == 401:
                msg = f"{msg}. {self._token_hint()}"
            fail(f"{method} {path} -> {r.status_code}: {msg}")
        return r.json() if r.content else None

    def _token_hint(self) -> str:
        """What to do about a refused or missing API token (a 401)."""
        where = f"The API token sent came from {self.token_source or 'the caller'}. "
        return (where + "Give one with --token or FEDWARD_TOKEN; on the coordinator host, the "
                "admin token is read from the data directory given with --home or "
                "FEDWARD_HOME (the one `fedward-coordinator init --home` created), e.g. "
                "`export FEDWARD_HOME=/var/lib/fedward/coordinator`; a token that expired or "
                "was revoked: `fedward-coordinator admin-token --home DIR`")


def api_client(api: str | None, token: str | None, home: Path | None) -> ApiClient:
    """A client for ``--api``/``FEDWARD_API`` (default: this home's API address) with the
    token from ``--token``, ``FEDWARD_TOKEN`` or the home's admin token file."""
    base = api or os.environ.get("FEDWARD_API")
    settings = settings_for(home)
    if base is None:
        base = f"http://{settings.api_host}:{settings.api_port}"
    source: str | None = None
    tok = token
    if tok is not None:
        source = "--token"
    elif (tok := os.environ.get("FEDWARD_TOKEN")) is not None:
        source = "FEDWARD_TOKEN"
    else:
        f = settings.home / ADMIN_TOKEN_FILE
        if f.exists():
            tok = f.read_text().strip()
            source = f"the admin token file {f}"
        else:
            source = f"nowhere: no --token, no FEDWARD_TOKEN and no admin token file at {f}"
    return ApiClient(base, tok, token_source=source)
