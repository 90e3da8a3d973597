"""Released models on disk and in the database: the release key, signed bundles and their
archives, lookup, revocation and the signed revocation list."""

from __future__ import annotations

import gzip
import io
import logging
import os
import stat
import tarfile
import threading
from pathlib import Path
from typing import Any, Final

from sqlmodel import Session, col, select

from coordinator.audit import append_event
from coordinator.models import (
    Release,
    ReleaseCandidate,
    User,
    utcnow,
)
from coordinator.release_errors import Conflict, Gone, IntegrityFailure, NotFound
from coordinator.release_queries import run_and_project
from export.bundle_format import SIGNATURE_FILE, BundleVerificationError
from export.bundle_keys import generate_release_key, public_key_fingerprint, public_key_path
from export.bundle_verify import VerifiedBundle, verify_bundle

__all__ = [
    "RELEASES_DIR",
    "bundle_archive",
    "bundle_dir",
    "find_release",
    "list_releases",
    "real_dir",
    "release_id_for",
    "release_key",
    "release_public_key",
    "release_view",
    "releases_dir",
    "revocation_list",
    "revoke_release",
    "signed_revocation_list",
    "verified_bundle",
]


log = logging.getLogger(__name__)


_RELEASE_KEY_DIR: Final = "release-key"

_RELEASE_KEY_FILE: Final = "release.pem"

RELEASES_DIR: Final = "releases"

_key_lock = threading.Lock()


def release_key(home: Path) -> tuple[Path, Path]:
    """The coordinator's release signing key, created at first use.

    The key lives in ``home/release-key/`` (folder mode 0700, private key 0600) and never
    leaves it; only the public key is served.

    Args:
        home: The coordinator's data directory.

    Returns:
        Paths of the private and the public key.

    Raises:
        IntegrityFailure: Only one half of the key pair exists.
    """
    folder = home / _RELEASE_KEY_DIR
    private = folder / _RELEASE_KEY_FILE
    public = public_key_path(private)
    with _key_lock:
        if not private.exists() and not public.exists():
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(folder, 0o700)
            try:
                generate_release_key(private)
            except FileExistsError:  # another process made it meanwhile
                pass
            else:
                log.info("release key created in %s", folder)
    if not (private.is_file() and public.is_file()):
        raise IntegrityFailure(f"the release key in {folder} is incomplete (private and "
                               "public key must both exist); restore it from backup")
    return private, public


def release_public_key(home: Path) -> tuple[bytes, str] | None:
    """The release public key (PEM) and its fingerprint, or ``None`` before the first release.

    Args:
        home: The coordinator's data directory.

    Returns:
        ``(pem, fingerprint)`` or ``None``.
    """
    public = public_key_path(home / _RELEASE_KEY_DIR / _RELEASE_KEY_FILE)
    if not public.is_file():
        return None
    pem = public.read_bytes()
    return pem, public_key_fingerprint(pem)


def real_dir(path: Path, what: str) -> None:
    """Refuse ``path`` unless it is a real folder (a symlink could lead out of ``home``)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        raise IntegrityFailure(f"{what} {path} does not exist") from None
    if stat.S_ISLNK(mode):
        raise IntegrityFailure(f"{what} {path} is a symlink; refusing to follow it")
    if not stat.S_ISDIR(mode):
        raise IntegrityFailure(f"{what} {path} is not a folder")


def releases_dir(home: Path) -> Path:
    folder = home / RELEASES_DIR
    if not folder.exists() and not folder.is_symlink():
        folder.mkdir(parents=True, exist_ok=True)
    real_dir(folder, "the releases folder")
    return folder


def bundle_dir(home: Path, release: Release) -> Path:
    """The release's bundle folder; refuse a stored path that is not ``releases/<id>``."""
    expected = f"{RELEASES_DIR}/{release.release_id}"
    if release.bundle_path != expected:
        raise IntegrityFailure(f"release {release.release_id}: stored bundle path "
                               f"{release.bundle_path!r} is not {expected!r}; refusing it")
    real_dir(home / RELEASES_DIR, "the releases folder")
    return home / expected


def release_id_for(project: str, run_id: int, round_number: int, candidate_id: int) -> str:
    return f"{project}-run{run_id}-round{round_number}-c{candidate_id}"


def verified_bundle(home: Path, release: Release) -> VerifiedBundle:
    """Verify a release's bundle on the coordinator's disk before it is served.

    Args:
        home: The coordinator's data directory.
        release: The release row.

    Returns:
        The verified bundle.

    Raises:
        IntegrityFailure: A stored path that is not ``releases/<id>``, a symlinked releases
            folder, a missing key or a bundle that fails :func:`export.bundle_verify.verify_bundle`
            (a symlink, an extra or changed file, ...).
    """
    folder = bundle_dir(home, release)
    key = release_public_key(home)
    if key is None:
        raise IntegrityFailure("the release public key is missing")
    public = public_key_path(home / _RELEASE_KEY_DIR / _RELEASE_KEY_FILE)
    try:
        return verify_bundle(bundle_dir=folder, public_key=public,
                             release_id=release.release_id)
    except BundleVerificationError as err:
        raise IntegrityFailure(f"the bundle of release {release.release_id} on the "
                               f"coordinator fails verification: {err}") from None


def bundle_archive(home: Path, release: Release) -> bytes:
    """The release's bundle as a ``.tar.gz`` with one top folder named after the release.

    The bundle is verified first and every file's bytes are checked again as they are
    archived; the archive is reproducible (fixed times and owners).

    Args:
        home: The coordinator's data directory.
        release: An unrevoked release.

    Returns:
        The archive's bytes.

    Raises:
        Gone: The release is revoked.
        IntegrityFailure: See :func:`verified_bundle`.
    """
    if release.revoked_at is not None:
        raise Gone(f"release {release.release_id} was revoked: {release.revoke_reason}")
    verified = verified_bundle(home, release)
    contents = {name: verified.read_verified(name) for name in sorted(verified.files)}
    sig = (verified.path / SIGNATURE_FILE).read_bytes()
    mtime = int(release.created_at.timestamp())
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=mtime) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folder = tarfile.TarInfo(release.release_id)
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, mtime
        tar.addfile(folder)
        for name, data in [*contents.items(), (SIGNATURE_FILE, sig)]:
            info = tarfile.TarInfo(f"{release.release_id}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, mtime
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def revoke_release(session: Session, *, release_id: str, user: User, reason: str) -> Release:
    """Revoke a release (the caller commits); it leaves the portal and the revocation list
    names it.

    Args:
        session: Open session.
        release_id: The release.
        user: The admin revoking it.
        reason: Why (published in the revocation list).

    Returns:
        The release.

    Raises:
        NotFound: No such release.
        Conflict: Already revoked.
    """
    release = find_release(session, release_id)
    if release.revoked_at is not None:
        raise Conflict(f"release {release_id} was already revoked by {release.revoked_by}: "
                       f"{release.revoke_reason}")
    release.revoked_at, release.revoked_by, release.revoke_reason = utcnow(), user.name, reason
    session.add(release)
    append_event(session, actor=user.name, action="release.revoked",
                 subject=f"release:{release_id}", detail={"reason": reason})
    return release


def find_release(session: Session, release_id: str) -> Release:
    """The release called ``release_id``.

    Raises:
        NotFound: No such release.
    """
    release = session.exec(select(Release).where(Release.release_id == release_id)).first()
    if release is None:
        raise NotFound(f"release {release_id!r} not found")
    return release


def list_releases(session: Session, *, include_revoked: bool) -> list[Release]:
    """Releases, newest first; revoked ones only with ``include_revoked``.

    Args:
        session: Open session.
        include_revoked: Also list revoked releases (never for clinicians).

    Returns:
        The release rows.
    """
    query = select(Release).order_by(col(Release.id).desc())
    if not include_revoked:
        query = query.where(col(Release.revoked_at).is_(None))
    return list(session.exec(query).all())


def release_view(session: Session, release: Release) -> dict[str, Any]:
    """What the API and the portal show of a release (its model card is in the bundle).

    Args:
        session: Open session.
        release: The release row.

    Returns:
        JSON-ready fields: ids, project, task, version, intended use, who proposed and
        approved it and why, when, revocation and the signing key's fingerprint.
    """
    cand = session.get(ReleaseCandidate, release.candidate_id)
    assert cand is not None  # foreign key
    run, project = run_and_project(session, cand.run_id)
    return {
        "release_id": release.release_id,
        "project": project.name,
        "task": run.task,
        "run_id": cand.run_id,
        "round": cand.round_number,
        "candidate_id": cand.id,
        "intended_use": cand.intended_use,
        "proposed_by": cand.proposed_by,
        "approved_by": cand.decided_by,
        "approval_reason": cand.decision_reason,
        "created_at": release.created_at,
        "revoked_at": release.revoked_at,
        "revoked_by": release.revoked_by,
        "revoke_reason": release.revoke_reason,
        "key_fingerprint": release.key_fingerprint,
    }


def revocation_list(session: Session) -> dict[str, Any]:
    """The revoked releases (unsigned: what the signed list is made of, and what staff see).

    Args:
        session: Open session.

    Returns:
        ``{"revoked": [{"release_id", "revoked_at", "reason"}], "generated_at"}``.
    """
    rows = session.exec(select(Release).where(col(Release.revoked_at).is_not(None))
                        .order_by(col(Release.revoked_at))).all()
    return {
        "revoked": [{"release_id": r.release_id,
                     "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
                     "reason": r.revoke_reason} for r in rows],
        "generated_at": utcnow().isoformat(),
    }


def signed_revocation_list(session: Session, home: Path) -> dict[str, Any] | None:
    """The public revocation list, signed now with the release key, as ``fedward-verify``
    and ``fedward-serve`` read it (see :mod:`export.revocations`).

    Args:
        session: Open session.
        home: The coordinator's data directory (the release key is under it).

    Returns:
        The signed document, or ``None`` before the first release (no key, nothing to
        revoke).
    """
    from export.revocations import sign_revocations

    if release_public_key(home) is None:
        return None
    private, _public = release_key(home)
    listed = revocation_list(session)
    return sign_revocations(revoked=listed["revoked"], private_key=private,
                            issued_at=utcnow())
