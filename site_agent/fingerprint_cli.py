"""``fedward-site fingerprint``: the data fingerprint this site sends, and how to check it.

Every trained round carries the site's data fingerprint to the coordinator, and it ends up
in the lineage of every signed model card. The file's digest in it is an HMAC-SHA256 under
a key only this site holds (``keys/fingerprint.key``), so that nobody holding a candidate
copy of the file can confirm that the site holds it. This command recomputes it from the
file, explains it, and with ``--reveal-key`` prints the key for an auditor (the reveal is
written to the site's audit log).
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from site_agent.cli_common import fail
from site_agent.config import ConfigError, SiteConfig, SitePaths

__all__ = ["fingerprint"]

# soft_wrap: a path, a key or a command is never broken across lines (people copy them).
_console = Console(highlight=False, soft_wrap=True)


def fingerprint(
    dir: Annotated[Path, typer.Option("--dir", help="the site's data directory")],
    reveal_key: Annotated[bool, typer.Option(
        "--reveal-key", help="also print the fingerprint key, for an auditor (recorded in "
                             "the site's audit log)")] = False,
) -> None:
    """Show the data fingerprint this site sends and how anyone given the key checks it."""
    # Imported here: `fedward-site` must not pay for scikit-learn on every command.
    from site_agent.data import keyed_fingerprint
    from site_agent.keys import FINGERPRINT_KEY_FILE, ensure_fingerprint_key

    root = dir.expanduser().resolve()
    try:
        cfg = SiteConfig.load(root)
    except ConfigError as err:
        fail(str(err))
    from site_agent.connectors import ConnectorError
    from site_agent.data_table import TableReadError

    key_path = SitePaths(root).keys / FINGERPRINT_KEY_FILE
    try:
        file_path: Path | None = cfg.resolve(root, cfg.data_path)
        if cfg.data is None:
            assert file_path is not None
            source = str(file_path)
            content = file_path.read_bytes()
        else:  # a connector: the bytes it digests (a file's, or a query result's)
            connector = cfg.connector(root)
            file_path = getattr(connector, "path", None)
            source = str(file_path) if file_path is not None else connector.describe()
            content = connector.read().content
        key = ensure_fingerprint_key(key_path)
    except (OSError, ValueError, ConnectorError) as err:
        fail(str(err))
    except TableReadError as err:
        fail(err.problem.message)
    value = keyed_fingerprint(key, content)
    _console.print(f"data file:    {escape(source)}")
    _console.print(f"content-hmac: {value}")
    _console.print(
        "This is what leaves the site with every trained round (with the schema hash and "
        "row counts): the HMAC-SHA256 of the file's bytes under this site's fingerprint key "
        f"({escape(str(key_path))}, mode 0600, never sent). Without the key nobody can "
        "tell from it whether a given file is this site's file; another site holding the "
        "same file sends another value.")
    if not reveal_key:
        _console.print("An auditor who must check it: run this command with --reveal-key "
                       "and give them the key and the file.")
        return
    from site_agent.audit import AuditLog, AuditLogError

    try:
        by = getpass.getuser()
    except (OSError, KeyError):
        by = "unknown"
    try:
        AuditLog(SitePaths(root).audit_log).append("fingerprint-key-revealed", {"by": by})
    except AuditLogError as err:
        fail("the reveal could not be recorded in the audit log, so the key is not shown: "
             f"{err}")
    _console.print(f"fingerprint key (hex): {key.hex()}")
    if file_path is not None:
        _console.print("The auditor recomputes the fingerprint with:")
        _console.print(f"  openssl dgst -sha256 -mac HMAC -macopt hexkey:{key.hex()} "
                       f"{escape(str(file_path))}")
    else:
        _console.print("The auditor recomputes it over the query's result as JSON lines "
                       "(the header, then one JSON array per row), e.g. with the same "
                       "openssl command on that text.")
    _console.print("Whoever holds the key can test guesses of the file against the "
                   "fingerprints in the coordinator's lineage: keep it as private as the data.")
