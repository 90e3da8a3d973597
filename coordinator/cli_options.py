"""Options every ``fedward-coordinator`` command that talks to the API shares."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["ApiOpt", "HomeOpt", "TokenOpt"]

HomeOpt = Annotated[Path | None, typer.Option("--home", help="Coordinator data directory "
                                              "(default $FEDWARD_HOME or ~/.fedward/coordinator)")]
ApiOpt = Annotated[str | None, typer.Option("--api", help="API base URL (default "
                                            "$FEDWARD_API or http://127.0.0.1:8600)")]
TokenOpt = Annotated[str | None, typer.Option("--token", help="API token (default "
                                              "$FEDWARD_TOKEN or the admin token file)")]
