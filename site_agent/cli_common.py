"""What the ``fedward-site`` command modules share: the ``--dir`` option, the consoles, and
the one way a command fails."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

__all__ = ["DirOpt", "console", "err_console", "fail"]

DirOpt = Annotated[Path, typer.Option("--dir", help="the site's data directory")]
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: MESSAGE`` on stderr and exit with ``code``."""
    # soft_wrap: never break an error (a path, a command to copy) at the terminal's width.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False,
                      soft_wrap=True)
    raise typer.Exit(code)
