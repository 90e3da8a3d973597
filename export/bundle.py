"""Signed release bundles: one folder, every byte covered by one signature.

A bundle is a plain folder::

    <release>/
        model.onnx          the artefacts (names in ARTEFACT_FILES)
        model.int8.onnx
        model.xml, model.bin
        model_card.json     intended use, metrics, privacy statement, lineage, release_id
        model_card.md       the same for people
        model.sig           the signature over a manifest of every other file's SHA-256

``model.sig`` is in the OpenSSF model-signing format (``model-signing`` 1.1.1, key mode,
EC P-256): a Sigstore bundle whose DSSE envelope carries an in-toto statement listing every
file and its SHA-256 digest. Anyone can check the signature and the signed files with the
standard tool (``--no-ignore-git-paths``: by default it skips ``.git*`` files)::

    model_signing verify key <release> --signature <release>/model.sig --public_key pub.pem \
        --no-ignore-git-paths

Signing goes through the ``model_signing`` Python API, so the format is the standard one by
construction. Verification here does not use ``model_signing``: it reads the same format
with plain ``cryptography`` (ECDSA P-256 over the DSSE pre-authentication encoding) and is
stricter than the standard tool's defaults. That tool ignores ``.git*`` files and follows
the serialization options named inside the signature; :func:`verify_bundle` accepts exactly
one serialization (every file, SHA-256, no symlinks, only ``model.sig`` left out), refuses
any symlink, special file, unlisted file or folder, and any manifest name that is not a
plain relative path, and refuses a release id it is told is revoked (the signed revocation
list is :mod:`export.revocations`). It fails closed: it returns a
:class:`VerifiedBundle` or raises one :class:`BundleVerificationError` whose message says
what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedward.files import atomic_write

__all__ = [
    "ARTEFACT_FILES",
    "FORMATS",
    "MODEL_CARD_JSON",
    "MODEL_CARD_MD",
    "RELEASE_ID_KEY",
    "SERVING_FILE",
    "SIGNATURE_FILE",
    "ArtefactFormat",
    "BundleError",
    "BundleVerificationError",
    "BundleWriteError",
    "VerifiedBundle",
    "generate_release_key",
    "public_key_fingerprint",
    "public_key_path",
    "render_model_card_md",
    "verify_bundle",
    "write_bundle",
]

ArtefactFormat = Literal["onnx", "onnx-int8", "openvino"]
FORMATS: Final[tuple[ArtefactFormat, ...]] = ("onnx", "onnx-int8", "openvino")

# Standard names of each format's files inside a bundle (and in an export folder).
ARTEFACT_FILES: Final[Mapping[ArtefactFormat, tuple[str, ...]]] = {
    "onnx": ("model.onnx",),
    "onnx-int8": ("model.int8.onnx",),
    "openvino": ("model.xml", "model.bin"),
}
SERVING_FILE: Final = "model.onnx"  # what the inference service loads
SIGNATURE_FILE: Final = "model.sig"
MODEL_CARD_JSON: Final = "model_card.json"
MODEL_CARD_MD: Final = "model_card.md"
RELEASE_ID_KEY: Final = "release_id"
_RESERVED: Final = frozenset({SIGNATURE_FILE, MODEL_CARD_JSON, MODEL_CARD_MD})

# The OpenSSF model-signing v1.0 format, key mode, as model-signing 1.1.1 writes it.
_BUNDLE_MEDIA_TYPE: Final = "application/vnd.dev.sigstore.bundle.v0.3+json"
_PAYLOAD_TYPE: Final = "application/vnd.in-toto+json"
_STATEMENT_TYPE: Final = "https://in-toto.io/Statement/v1"
_PREDICATE_TYPE: Final = "https://model_signing/signature/v1.0"
_SERIALIZATION: Final[Mapping[str, Any]] = {
    "method": "files",
    "hash_type": "sha256",
    "allow_symlinks": False,
    "ignore_paths": [SIGNATURE_FILE],
}

# One path component: starts with a letter, digit or underscore (no hidden files, no "."
# or ".."), then letters, digits, "._-". Nothing that a shell, Windows or a URL treats
# specially.
_SAFE_PART: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_RELEASE_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_MAX_SIGNATURE_BYTES: Final = 16 * 1024 * 1024
_MAX_CARD_BYTES: Final = 16 * 1024 * 1024
_CHUNK: Final = 1024 * 1024


class BundleError(Exception):
    """Base class of the bundle errors."""


class BundleWriteError(BundleError):
    """A bundle could not be written; nothing was left at the final path."""


class BundleVerificationError(BundleError):
    """A bundle failed verification. The message is the reason, fit to show a person."""


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle that passed :func:`verify_bundle`.

    Attributes:
        path: The bundle folder.
        release_id: The release id from the signed model card.
        files: Every signed file name and its SHA-256 (hex); ``model.sig`` is not listed.
        model_card: The signed model card.
        key_fingerprint: Fingerprint of the key that verified it (see
            :func:`public_key_fingerprint`).
    """

    path: Path
    release_id: str
    files: Mapping[str, str]
    model_card: Mapping[str, Any] = field(repr=False)
    key_fingerprint: str

    def read_verified(self, name: str) -> bytes:
        """Read one signed file and check its digest again on the bytes returned.

        Loading an artefact from these bytes (rather than from the path) closes the gap
        between verification and use: a file swapped after :func:`verify_bundle` is caught.

        Args:
            name: A file name from :attr:`files`.

        Returns:
            The file's content.

        Raises:
            BundleVerificationError: The name is not signed, or the file changed.
        """
        if name not in self.files:
            raise BundleVerificationError(f"{name!r} is not a signed file of this bundle")
        data = _read_regular(self.path, name)
        if hashlib.sha256(data).hexdigest() != self.files[name]:
            raise BundleVerificationError(f"digest mismatch: {name} changed since it was "
                                          "verified")
        return data


# --------------------------------------------------------------------------- keys


def public_key_path(private_key: Path) -> Path:
    """Where :func:`generate_release_key` puts the public half of ``private_key``.

    ``release.pem`` -> ``release.pub.pem``; ``release_key`` -> ``release_key.pub.pem``.

    Args:
        private_key: Path of the private key file.

    Returns:
        Path of the public key file beside it.
    """
    private_key = Path(private_key)
    stem = private_key.stem if private_key.suffix == ".pem" else private_key.name
    return private_key.with_name(stem + ".pub.pem")


def generate_release_key(path: Path) -> None:
    """Create a release signing key: EC P-256, PEM, private file mode 0600.

    The private key is written to ``path`` (PKCS#8, unencrypted: protect it with file
    permissions and the host's disk encryption) and the public key to
    :func:`public_key_path` of it. Neither file may exist already: a release key is never
    silently replaced, because every bundle signed with the old one would stop verifying.

    Args:
        path: Path of the private key file to create.

    Raises:
        FileExistsError: One of the two files exists.
    """
    path = Path(path)
    pub_path = public_key_path(path)
    if pub_path.exists():
        raise FileExistsError(f"public key {pub_path} exists; refusing to replace it")
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # O_EXCL: never overwrite; mode 0600 from creation, never briefly world-readable.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
        fh.flush()
        os.fsync(fh.fileno())
    pub_path.write_bytes(_public_pem(key.public_key()))


def public_key_fingerprint(pub_pem: bytes) -> str:
    """The fingerprint people compare to trust a release key.

    It is the SHA-256 (hex) of the key's canonical SubjectPublicKeyInfo PEM, the same value
    that model-signing writes as the key hint in every ``model.sig``, so a reader can match
    a signature to the key the portal shows.

    Args:
        pub_pem: A PEM public key.

    Returns:
        64 lowercase hex characters.

    Raises:
        ValueError: ``pub_pem`` is not a PEM public key.
    """
    key = serialization.load_pem_public_key(pub_pem)
    return hashlib.sha256(
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).hexdigest()


def _public_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleVerificationError(f"cannot read the release public key {path}: {exc}") \
            from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise BundleVerificationError(f"release public key {path} is not an EC P-256 key")
    return key


def _load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleWriteError(f"cannot read the release private key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise BundleWriteError(f"release private key {path} is not an EC P-256 key")
    return key


# --------------------------------------------------------------------------- names


def _name_problem(name: object) -> str | None:
    """Why ``name`` is not a plain relative path inside a bundle, or None if it is."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if "\\" in name or "\x00" in name:
        return "contains a backslash or NUL"
    if name.startswith("/") or PurePosixPath(name).is_absolute():
        return "is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "contains '..'"
    if any(not _SAFE_PART.fullmatch(p) for p in parts):
        return "has an empty, hidden or unsafe path component"
    return None


def _check_names(names: list[str]) -> None:
    problems = []
    for name in names:
        why = _name_problem(name)
        if why is not None:
            problems.append(f"{name!r} {why}")
        elif name in _RESERVED:
            problems.append(f"{name!r} is reserved for the bundle itself")
    as_set = set(names)
    for name in names:
        parents = PurePosixPath(name).parents
        clash = [str(p) for p in parents if str(p) in as_set]
        if clash:
            problems.append(f"{name!r} would sit inside the file {clash[0]!r}")
    if problems:
        raise BundleWriteError("file names must be plain relative paths inside the bundle: "
                               + "; ".join(problems))


# --------------------------------------------------------------------------- writing


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
    if not _SAFE_PART.fullmatch(name):
        raise BundleWriteError(f"bundle folder name {name!r} must be a plain name "
                               "(letters, digits, '._-', not starting with '.')")
    if final.exists() or final.is_symlink():
        raise BundleWriteError(f"refusing to overwrite existing bundle {final}")
    names = list(files)
    _check_names(names)
    missing = [f"{n} ({files[n]})" for n in names if not Path(files[n]).is_file()]
    if missing:
        raise BundleWriteError("source files not found: " + ", ".join(missing))
    card = dict(model_card)
    release_id = card.get(RELEASE_ID_KEY)
    if not isinstance(release_id, str) or not _RELEASE_ID.fullmatch(release_id):
        raise BundleWriteError(f"model card needs a {RELEASE_ID_KEY!r} made of letters, "
                               f"digits and '._-'; got {release_id!r}")
    try:
        card_json = json.dumps(card, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise BundleWriteError(f"model card is not strict JSON: {exc}") from None
    key = _load_private_key(private_key)

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
        _verify(stage, key.public_key(), frozenset(), release_id)
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
        while chunk := fin.read(_CHUNK):
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


def render_model_card_md(card: Mapping[str, Any], digests: Mapping[str, str]) -> str:
    """Render the model card for people: known sections first, the rest as JSON.

    Args:
        card: The model card (as written to ``model_card.json``).
        digests: Artefact file name -> SHA-256 hex, listed in a table.

    Returns:
        Markdown text.
    """
    release_id = card.get(RELEASE_ID_KEY, "?")
    lines = [f"# Model release {release_id}", ""]
    first = ("task", "intended_use", "contributing_sites", "privacy_statement",
             "membership_inference")
    for key in first:
        if key in card:
            value = card[key]
            text = (_contributors_md(value) if key == "contributing_sites" else
                    _membership_md(value, card.get("privacy_statement"))
                    if key == "membership_inference" else None)
            lines += [f"## {key.replace('_', ' ').capitalize()}", "",
                      text if text is not None else _md_value(value), ""]
    for key in sorted(k for k in card if k not in {RELEASE_ID_KEY, *first}):
        lines += [f"## {key.replace('_', ' ').capitalize()}", "", _md_value(card[key]), ""]
    lines += ["## Files", "", "| file | SHA-256 |", "|---|---|"]
    lines += [f"| `{n}` | `{d}` |" for n, d in sorted(digests.items())]
    lines += [
        "",
        "The signed manifest in `model.sig` is authoritative. Check the bundle before use, "
        "signature, files and revocation together:",
        "",
        "    fedward-verify <bundle> --public-key <release key .pub.pem> "
        "--coordinator <release portal address>",
        "",
        "The standard OpenSSF tool checks the signature and the signed files only (not "
        "revocation, not the release id, not stray empty folders); as a second opinion, "
        "with `.git*` files included:",
        "",
        "    model_signing verify key <bundle> --signature <bundle>/model.sig "
        "--public_key <release key .pub.pem> --no-ignore-git-paths",
        "",
    ]
    return "\n".join(lines)


def _membership_md(value: Any, privacy: Any) -> str | None:
    """The measured-leakage section as a table beside each site's epsilon, or ``None``."""
    if not isinstance(value, Mapping) or not isinstance(value.get("per_site"), Mapping):
        return None
    spent = privacy.get("per_site", {}) if isinstance(privacy, Mapping) else {}
    rows = [str(value.get("method", "")), "",
            "| site | epsilon spent | attack AUC | loss AUC | calibrated AUC | "
            "empirical epsilon >= | rows per side |", "|---|---|---|---|---|---|---|"]
    for site, a in sorted(value["per_site"].items()):
        if not isinstance(a, Mapping):
            continue
        eps = spent.get(site, {}).get("epsilon") if isinstance(spent, Mapping) else None
        rows.append(f"| {site} | {_md_value(eps)} | {_md_value(a.get('auc'))} | "
                    f"{_md_value(a.get('loss_auc'))} | {_md_value(a.get('calibrated_auc'))} | "
                    f"{_md_value(a.get('epsilon_lower_bound'))} | {_md_value(a.get('n'))} |")
    if not value["per_site"]:
        rows.append("| (no site reported an audit) | | | | | | |")
    return "\n".join(rows)


def _contributors_md(value: Any) -> str | None:
    """Which sites trained the model, as a table; ``None`` if ``value`` has another shape."""
    if not isinstance(value, Mapping) or not isinstance(value.get("rounds_per_site"), Mapping):
        return None
    total = value.get("completed_rounds")
    counted = set(value.get("contributing") or [])
    share = value.get("min_round_share")
    share_text = f"{share:.0%}" if isinstance(share, int | float) else str(share)
    rows = [f"| {site} | {n} of {total} | {'yes' if site in counted else 'no'} |"
            for site, n in sorted(value["rounds_per_site"].items())]
    return "\n".join([
        f"A site counts as contributing when it trained in at least {share_text} of the "
        f"completed rounds; at least "
        f"{value.get('min_sites')} had to.", "",
        "| site | rounds trained | contributing |", "|---|---|---|", *rows])


def _md_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    return "```json\n" + json.dumps(value, indent=2, sort_keys=True) + "\n```"


# --------------------------------------------------------------------------- verifying


def verify_bundle(*, bundle_dir: Path, public_key: Path,
                  revoked: set[str] | frozenset[str] = frozenset(),
                  release_id: str | None = None) -> VerifiedBundle:
    """Verify a bundle; fail closed.

    Checks, in order: the folder holds only regular files and folders (no symlink
    anywhere, even one that points inside); ``model.sig`` exists and is signed by
    ``public_key``; the signed manifest uses the expected serialization and names only
    plain relative paths; no signed file is missing and no unsigned file or folder is
    present; every file's SHA-256 matches; the signed model card has a release id, which
    equals ``release_id`` if given and is not in ``revoked``.

    Args:
        bundle_dir: The bundle folder.
        public_key: The release public key (PEM), obtained out of band (the portal shows
            its fingerprint); never one shipped inside the bundle.
        revoked: Revoked release ids.
        release_id: The release the caller expects (guards against being handed another,
            validly signed release, such as an older one).

    Returns:
        The verified bundle.

    Raises:
        BundleVerificationError: With the reason, on any failure.
    """
    key = _load_public_key(Path(public_key))
    return _verify(Path(bundle_dir), key, frozenset(revoked), release_id)


def _verify(root: Path, key: ec.EllipticCurvePublicKey, revoked: frozenset[str],
            expected_release: str | None) -> VerifiedBundle:
    fingerprint = hashlib.sha256(_public_pem(key)).hexdigest()
    on_disk, folders = _scan(root)
    if SIGNATURE_FILE not in on_disk:
        raise BundleVerificationError(f"unsigned bundle: {SIGNATURE_FILE} is missing")
    statement = _verified_statement(root, key, fingerprint)
    manifest = _manifest(statement)

    problems = []
    on_disk.discard(SIGNATURE_FILE)
    missing = sorted(set(manifest) - on_disk)
    extra = sorted(on_disk - set(manifest))
    expected_folders = {str(p) for n in manifest for p in PurePosixPath(n).parents
                        if str(p) != "."}
    extra_folders = sorted(folders - expected_folders)
    if missing:
        problems.append(f"missing file{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    if extra:
        problems.append(f"extra file{'s' if len(extra) > 1 else ''} not in the signed "
                        f"manifest: {', '.join(extra)}")
    if extra_folders:
        problems.append("extra folder not in the signed manifest: " + ", ".join(extra_folders))
    if problems:
        raise BundleVerificationError("; ".join(problems))

    card_bytes = b""
    changed = []
    for name in sorted(manifest):
        if name == MODEL_CARD_JSON:
            card_bytes = _read_regular(root, name, limit=_MAX_CARD_BYTES)
            digest = hashlib.sha256(card_bytes).hexdigest()
        else:
            digest = _sha256_file(root, name)
        if digest != manifest[name]:
            changed.append(name)
    if changed:
        raise BundleVerificationError(f"digest mismatch: {', '.join(changed)} changed since "
                                      "it was signed")

    if MODEL_CARD_JSON not in manifest:
        raise BundleVerificationError(f"{MODEL_CARD_JSON} is not in the signed manifest")
    try:
        card = json.loads(card_bytes)
    except ValueError:
        raise BundleVerificationError(f"{MODEL_CARD_JSON} is not valid JSON") from None
    release_id = card.get(RELEASE_ID_KEY) if isinstance(card, dict) else None
    if not isinstance(release_id, str) or not _RELEASE_ID.fullmatch(release_id):
        raise BundleVerificationError(f"{MODEL_CARD_JSON} has no valid {RELEASE_ID_KEY}")
    if expected_release is not None and release_id != expected_release:
        raise BundleVerificationError(f"bundle is release {release_id}, expected release "
                                      f"{expected_release}")
    if release_id in revoked:
        raise BundleVerificationError(f"release {release_id} is revoked")
    return VerifiedBundle(path=root, release_id=release_id, files=MappingProxyType(manifest),
                          model_card=card, key_fingerprint=fingerprint)


def _scan(root: Path) -> tuple[set[str], set[str]]:
    """Relative names of every file and folder under ``root``; refuse anything else."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        raise BundleVerificationError(f"bundle folder {root} does not exist") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleVerificationError(f"bundle path {root} is a symlink")
    if not stat.S_ISDIR(st.st_mode):
        raise BundleVerificationError(f"bundle path {root} is not a folder")
    files: set[str] = set()
    folders: set[str] = set()
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        with os.scandir(folder) as it:
            for entry in it:
                rel = prefix + entry.name
                # is_symlink/is_file/is_dir(follow_symlinks=False) use lstat: a symlink is
                # never followed, wherever it points.
                if entry.is_symlink():
                    target = os.readlink(entry.path)
                    raise BundleVerificationError(f"symlink in bundle: {rel} -> {target}")
                if entry.is_dir(follow_symlinks=False):
                    folders.add(rel)
                    pending.append((Path(entry.path), rel + "/"))
                elif entry.is_file(follow_symlinks=False):
                    files.add(rel)
                else:
                    raise BundleVerificationError(f"not a regular file in bundle: {rel}")
    return files, folders


def _pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature actually covers."""
    return b"DSSEv1 %d %s %d %s" % (len(_PAYLOAD_TYPE), _PAYLOAD_TYPE.encode(),
                                    len(payload), payload)


def _verified_statement(root: Path, key: ec.EllipticCurvePublicKey,
                        fingerprint: str) -> Mapping[str, Any]:
    raw = _read_regular(root, SIGNATURE_FILE, limit=_MAX_SIGNATURE_BYTES)
    malformed = f"{SIGNATURE_FILE} is malformed"
    try:
        sig_bundle = json.loads(raw)
        if sig_bundle["mediaType"] != _BUNDLE_MEDIA_TYPE:
            raise BundleVerificationError(f"{malformed}: media type "
                                          f"{sig_bundle['mediaType']!r}")
        envelope = sig_bundle["dsseEnvelope"]
        if envelope["payloadType"] != _PAYLOAD_TYPE:
            raise BundleVerificationError(f"{malformed}: payload type "
                                          f"{envelope['payloadType']!r}")
        signatures = envelope["signatures"]
        if not isinstance(signatures, list) or len(signatures) != 1:
            raise BundleVerificationError(f"{malformed}: expected exactly one signature")
        payload = base64.b64decode(envelope["payload"], validate=True)
        signature = base64.b64decode(signatures[0]["sig"], validate=True)
        hint = (sig_bundle.get("verificationMaterial") or {}).get("publicKey", {}).get("hint")
    except BundleVerificationError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        raise BundleVerificationError(malformed) from None

    if hint and hint != fingerprint:
        raise BundleVerificationError(
            f"bad signature: signed by another key ({str(hint)[:16]}), not the release key "
            f"({fingerprint[:16]})"
        )
    try:
        key.verify(signature, _pae(payload), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise BundleVerificationError(
            f"bad signature: {SIGNATURE_FILE} does not verify with the release key "
            f"({fingerprint[:16]})"
        ) from None
    try:
        statement = json.loads(payload)
    except ValueError:
        raise BundleVerificationError(f"{malformed}: signed statement is not JSON") from None
    if not isinstance(statement, dict):
        raise BundleVerificationError(f"{malformed}: signed statement is not an object")
    return statement


def _manifest(statement: Mapping[str, Any]) -> dict[str, str]:
    """The signed file -> SHA-256 manifest, after checking the statement's shape."""
    if (statement.get("_type") != _STATEMENT_TYPE
            or statement.get("predicateType") != _PREDICATE_TYPE):
        raise BundleVerificationError("unsupported signature: not an OpenSSF model-signing "
                                      "v1.0 statement")
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict):
        raise BundleVerificationError("unsupported signature: statement has no predicate")
    serialization_ = predicate.get("serialization")
    if serialization_ != dict(_SERIALIZATION):
        raise BundleVerificationError(
            f"unsupported signature: serialization {serialization_!r}, expected "
            f"{dict(_SERIALIZATION)!r}"
        )
    resources = predicate.get("resources")
    if not isinstance(resources, list):
        raise BundleVerificationError("unsupported signature: statement lists no files")
    manifest: dict[str, str] = {}
    for res in resources:
        if not isinstance(res, dict):
            raise BundleVerificationError("unsupported signature: bad manifest entry")
        name, digest = res.get("name"), res.get("digest")
        why = _name_problem(name)
        if why is not None:
            raise BundleVerificationError(
                f"manifest entry {name!r} is not a plain relative path inside the bundle "
                f"({why})"
            )
        assert isinstance(name, str)  # checked by _name_problem
        if name == SIGNATURE_FILE:
            raise BundleVerificationError(f"manifest entry {name!r} is reserved")
        if name in manifest:
            raise BundleVerificationError(f"manifest lists {name!r} twice")
        if (res.get("algorithm") != "sha256" or not isinstance(digest, str)
                or not _HEX64.fullmatch(digest)):
            raise BundleVerificationError(f"manifest entry {name!r} has no SHA-256 digest")
        manifest[name] = digest
    return manifest


def _open_nofollow(root: Path, name: str) -> int:
    # O_NOFOLLOW on the last component; _scan already refused symlinks in the folders.
    try:
        return os.open(root / name, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise BundleVerificationError(f"missing file: {name}") from None
    except OSError as exc:
        raise BundleVerificationError(f"cannot read {name}: {exc.strerror}") from None


def _read_regular(root: Path, name: str, *, limit: int | None = None) -> bytes:
    fd = _open_nofollow(root, name)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise BundleVerificationError(f"not a regular file in bundle: {name}")
        data = fh.read() if limit is None else fh.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise BundleVerificationError(f"{name} is larger than {limit} bytes")
    return data


def _sha256_file(root: Path, name: str) -> str:
    fd = _open_nofollow(root, name)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise BundleVerificationError(f"not a regular file in bundle: {name}")
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
