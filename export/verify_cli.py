"""``fedward-verify``: check a release bundle before anyone uses it.

Exit 0 and ``verified: release <id>, N files`` when the signature, every digest, the file
list and the revocation status all check out; exit 1 with the reason otherwise. Run only
bundles this command accepts.

Revocation is checked by default against the coordinator's signed revocation list:
fetched with ``--coordinator URL`` (or ``FEDWARD_COORDINATOR``), or read from a signed list
saved from the portal with ``--revocations FILE``. Without either the bundle is refused;
``--unsafe-skip-revocation-check`` skips the check, with a warning, for an offline check
made knowingly.

``--version`` prints the Fedward version and the commit it was built from, then exits
(:func:`version_option`, shared with ``fedward-serve``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

import fedward
from export.bundle_format import BundleVerificationError
from export.bundle_verify import verify_bundle
from export.revocations import DEFAULT_MAX_AGE, UNSAFE_SKIP_FLAG, RevocationSource

__all__ = [
    "EXIT_OK",
    "EXIT_REFUSED",
    "UNSAFE_SKIP_WARNING",
    "CoordinatorOpt",
    "MaxAgeOpt",
    "RevocationsOpt",
    "UnsafeSkipOpt",
    "app",
    "main",
    "version_option",
]

EXIT_OK = 0
EXIT_REFUSED = 1  # the bundle must not be used; the message says why
UNSAFE_SKIP_WARNING = (
    "WARNING: revocation NOT checked (--unsafe-skip-revocation-check): this release may have "
    "been withdrawn. Check it against the release portal's revocation list before using it "
    "for patients.")

CoordinatorOpt = Annotated[str | None, typer.Option(
    "--coordinator", envvar="FEDWARD_COORDINATOR",
    help="The release portal's address (https://host): the signed revocation list is "
         "fetched from it at every check.")]
RevocationsOpt = Annotated[Path | None, typer.Option(
    "--revocations", help="A signed revocation list saved from the release portal "
                          "(/api/v1/revocations), instead of --coordinator.")]
UnsafeSkipOpt = Annotated[bool, typer.Option(
    UNSAFE_SKIP_FLAG, help="Do not check revocation at all (offline only, knowingly): a "
                           "withdrawn release then passes.")]
MaxAgeOpt = Annotated[float, typer.Option(
    "--max-revocation-age-days", min=0.01,
    help="Refuse a revocation list issued longer ago than this.")]



def _print_version(program: str) -> Callable[[bool], None]:
    def callback(value: bool) -> None:
        if value:
            typer.echo(fedward.version_line(program))
            raise typer.Exit()
    return callback


def version_option(program: str) -> Any:
    """A ``--version`` option for PROGRAM's command: eager, so it answers before the
    required options are asked for, and it loads nothing (no bundle, no ONNX Runtime)."""
    return typer.Option("--version", is_eager=True, callback=_print_version(program),
                        help="Print the version and the commit it was built from, then exit.")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Verify a Fedward release bundle (signature, digests, revocation).")


def revocation_source(*, coordinator: str | None, revocations: Path | None,
                      unsafe_skip: bool, max_age_days: float) -> RevocationSource:
    """The source the options name (see :class:`export.revocations.RevocationSource`).

    Raises:
        BundleVerificationError: None or several given, or a malformed address.
    """
    return RevocationSource(coordinator=coordinator, path=revocations, unsafe_skip=unsafe_skip,
                            max_age=timedelta(days=max_age_days))


@app.command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="The release bundle folder.")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The release public key "
                                             "(PEM), as published on the release portal.")],
    coordinator: CoordinatorOpt = None,
    revocations: RevocationsOpt = None,
    unsafe_skip_revocation_check: UnsafeSkipOpt = False,
    max_revocation_age_days: MaxAgeOpt = DEFAULT_MAX_AGE.days,
    release_id: Annotated[str | None, typer.Option(
        "--release-id", help="Also require this release id.")] = None,
    version: Annotated[bool, version_option("fedward-verify")] = False,
) -> None:
    """Verify BUNDLE against the release key and the signed revocation list."""
    try:
        source = revocation_source(coordinator=coordinator, revocations=revocations,
                                   unsafe_skip=unsafe_skip_revocation_check,
                                   max_age_days=max_revocation_age_days)
        listed = source.load(public_key)
        verified = verify_bundle(bundle_dir=bundle, public_key=public_key,
                                 revoked=frozenset() if listed is None else listed.revoked,
                                 release_id=release_id)
    except BundleVerificationError as exc:
        typer.echo(f"verification failed: {exc}", err=True)
        typer.echo("Do not use this bundle. Fetch it again from the release portal, or ask "
                   "the release administrator.", err=True)
        raise typer.Exit(EXIT_REFUSED) from None
    if listed is None:
        typer.echo(UNSAFE_SKIP_WARNING, err=True)
        typer.echo(f"verified (revocation not checked): release {verified.release_id}, "
                   f"{len(verified.files)} files")
        return
    typer.echo(f"verified: release {verified.release_id}, {len(verified.files)} files, not "
               f"revoked as of {listed.issued_at.isoformat(timespec='seconds')}")


def main() -> None:
    """Console entry point of ``fedward-verify``."""
    app()
