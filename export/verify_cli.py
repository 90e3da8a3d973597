"""``fedward-verify``: check a release bundle before anyone uses it.

Exit 0 and ``verified: release <id>, N files`` when the signature, every digest, the file
list and the revocation list all check out; exit 1 with the reason otherwise. Run only
bundles this command accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from export.bundle import BundleVerificationError, load_revocations, verify_bundle

__all__ = ["EXIT_OK", "EXIT_REFUSED", "app", "main"]

EXIT_OK = 0
EXIT_REFUSED = 1  # the bundle must not be used; the message says why

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Verify a Fedward release bundle (signature, digests, revocation).")


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="The release bundle folder.")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The release public key "
                                             "(PEM), as published on the release portal.")],
    revocations: Annotated[Path | None, typer.Option(
        "--revocations", help="Revocation list (JSON) from the release portal.")] = None,
    release_id: Annotated[str | None, typer.Option(
        "--release-id", help="Also require this release id.")] = None,
) -> None:
    """Verify BUNDLE against the release key and, if given, the revocation list."""
    try:
        revoked = load_revocations(revocations) if revocations is not None else frozenset()
        verified = verify_bundle(bundle_dir=bundle, public_key=public_key, revoked=revoked,
                                 release_id=release_id)
    except BundleVerificationError as exc:
        typer.echo(f"verification failed: {exc}", err=True)
        typer.echo("Do not use this bundle. Fetch it again from the release portal, or ask "
                   "the release administrator.", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    typer.echo(f"verified: release {verified.release_id}, {len(verified.files)} files")


def main() -> None:
    """Console entry point of ``fedward-verify``."""
    app()
