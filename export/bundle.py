"""Writing signed release bundles: one folder, every byte covered by one signature.

The folder's layout is in :mod:`export.bundle_format`. ``model.sig`` is in the OpenSSF
model-signing format (``model-signing`` 1.1.1, key mode, EC P-256): a Sigstore bundle whose
DSSE envelope carries an in-toto statement listing every file and its SHA-256 digest.
Anyone can check the signature and the signed files with the standard tool
(``--no-ignore-git-paths``: by default it skips ``.git*`` files)::

    model_signing verify key <release> --signature <release>/model.sig --public_key pub.pem \
        --no-ignore-git-paths

Signing goes through the ``model_signing`` Python API, so the format is the standard one by
construction. Verification is :mod:`export.bundle_verify` (stricter than the standard
tool's defaults).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from export.bundle_card import render_model_card_md
from export.bundle_format import (
    CHUNK_BYTES,
    MODEL_CARD_JSON,
    MODEL_CARD_MD,
    RELEASE_ID_KEY,
    RELEASE_ID_RE,
    SAFE_PART_RE,
    SIGNATURE_FILE,
    BundleVerificationError,
    BundleWriteError,
    check_names,
)
from export.bundle_keys import load_private_key
from export.bundle_verify import verify_folder
from fedward.files import atomic_write

__all__ = [
    "write_bundle",
]


def write_bundle(*, out_dir: Path, files: Mapping[str, Path], model_card: Mapping[str, Any],
                 private_key: Path) -> Path:
    """Write and sign a release bundle, atomically.

    The bundle is built in a sibling temporary folder ``.tmp-<name>-<random>``, signed,
    checked with :func:`verify_bundle`, flushed to disk (every file and folder fsynced),
    and only then renamed to ``out_dir`` in one ``os.rename``. A crash before the rename
    leaves nothing at ``out_dir``, only the clearly named temporary folder (removed here on
    any exception); a crash after it leaves a complete, signed bundle.

    Args:
        out_dir: The bundle folder to create; it must not exist. Its name must be a plain
            name (letters, digits, ``._-``).
        files: Bundle file name (plain relative POSIX path, e.g. ``model.onnx``) -> source
            file to copy. ``model.sig``, ``model_card.json`` and ``model_card.md`` are
            reserved.
        model_card: JSON-serialisable model card with a ``release_id``. Written as
            ``model_card.json`` and rendered to ``model_card.md``.
        private_key: The release key (EC P-256 PEM, unencrypted) to sign with.

    Returns:
        ``out_dir``.

    Raises:
        BundleWriteError: A bad file name, card or key, a missing source file, or an
            existing ``out_dir``. Nothing is written then.
    """
    final = Path(out_dir)
    name = final.name
    if not SAFE_PART_RE.fullmatch(name):
        raise BundleWriteError(f"bundle folder name {name!r} must be a plain name "
                               "(letters, digits, '._-', not starting with '.')")
    if final.exists() or final.is_symlink():
        raise BundleWriteError(f"refusing to overwrite existing bundle {final}")
    names = list(files)
    check_names(names)
    missing = [f"{n} ({files[n]})" for n in names if not Path(files[n]).is_file()]
    if missing:
        raise BundleWriteError("source files not found: " + ", ".join(missing))
    card = dict(model_card)
    release_id = card.get(RELEASE_ID_KEY)
    if not isinstance(release_id, str) or not RELEASE_ID_RE.fullmatch(release_id):
        raise BundleWriteError(f"model card needs a {RELEASE_ID_KEY!r} made of letters, "
                               f"digits and '._-'; got {release_id!r}")
    try:
        card_json = json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise BundleWriteError(f"model card is not strict JSON: {exc}") from None
    key = load_private_key(private_key)

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=final.parent))
    # The staged folder already carries the final name, so the signed statement names the
    # release, not the temporary folder.
    stage = tmp_root / name
    try:
        stage.mkdir()
        digests: dict[str, str] = {}
        for rel in sorted(names):
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            digests[rel] = _copy_synced(Path(files[rel]), dst)
        atomic_write(stage / MODEL_CARD_JSON, card_json.encode(), mode=0o644)
        md = render_model_card_md(card, digests)
        atomic_write(stage / MODEL_CARD_MD, md.encode(), mode=0o644)
        _sign_folder(stage, Path(private_key))
        _fsync_file(stage / SIGNATURE_FILE)
        # Never publish a bundle that would not verify.
        verify_folder(stage, key.public_key(), frozenset(), release_id)
        _fsync_tree(stage)
        _fsync_dir(tmp_root)
        if final.exists() or final.is_symlink():
            raise BundleWriteError(f"refusing to overwrite existing bundle {final}")
        # rename(2) replaces only an *empty* folder; a bundle is never empty, so an existing
        # bundle can never be overwritten here (ENOTEMPTY).
        os.rename(stage, final)
        _fsync_dir(final.parent)
    except BundleVerificationError as exc:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise BundleWriteError(f"the freshly signed bundle does not verify: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    shutil.rmtree(tmp_root, ignore_errors=True)
    return final


def _sign_folder(folder: Path, private_key: Path) -> None:
    """Write ``folder/model.sig`` with model-signing (key mode), covering every other file."""
    # Imported here: model_signing pulls in sigstore, which the verifying side never needs.
    from model_signing import hashing, signing

    # ignore_git_paths=False: the tool's default leaves .git* files out of the manifest.
    hashing_config = hashing.Config().set_ignored_paths(  # type: ignore[no-untyped-call]
        paths=[SIGNATURE_FILE], ignore_git_paths=False
    )
    signer = signing.Config()  # type: ignore[no-untyped-call]
    signer.use_elliptic_key_signer(private_key=private_key)
    signer.set_hashing_config(hashing_config)
    signer.sign(folder, folder / SIGNATURE_FILE)


def _copy_synced(src: Path, dst: Path) -> str:
    h = hashlib.sha256()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        while chunk := fin.read(CHUNK_BYTES):
            h.update(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        _fsync_dir(Path(dirpath))
