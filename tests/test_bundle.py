"""Tests of export.bundle and fedward-verify: signing, tamper refusals, atomic writes."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner

from export import bundle as bundle_mod
from export.bundle import write_bundle
from export.bundle_format import BundleVerificationError, BundleWriteError
from export.bundle_keys import generate_release_key, public_key_fingerprint, public_key_path
from export.bundle_verify import verify_bundle
from export.revocations import load_revocations, sign_revocations
from export.verify_cli import UNSAFE_SKIP_WARNING
from export.verify_cli import app as verify_app

RELEASE = "rel-1"


class Keys(Protocol):
    private: Path
    public: Path
    fingerprint: str


class _Keys:
    def __init__(self, folder: Path) -> None:
        self.private = folder / "release.pem"
        generate_release_key(self.private)
        self.public = public_key_path(self.private)
        self.fingerprint = public_key_fingerprint(self.public.read_bytes())


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    (tmp_path / "keys").mkdir()
    return _Keys(tmp_path / "keys")


@pytest.fixture
def other_keys(tmp_path: Path) -> Keys:
    (tmp_path / "other-keys").mkdir()
    return _Keys(tmp_path / "other-keys")


MakeBundle = Callable[..., Path]


@pytest.fixture
def make_bundle(tmp_path: Path, keys: Keys) -> MakeBundle:
    """Factory: write a signed bundle of small stand-in artefacts; return its folder."""
    src = tmp_path / "src"
    src.mkdir()
    contents = {"model.onnx": os.urandom(4096), "model.xml": b"<net/>\n",
                "model.bin": os.urandom(2048)}
    for name, data in contents.items():
        (src / name).write_bytes(data)

    def make(release_id: str = RELEASE, *, private_key: Path | None = None,
             name: str | None = None, files: dict[str, Path] | None = None) -> Path:
        return write_bundle(
            out_dir=tmp_path / "releases" / (name or release_id),
            files=files if files is not None else {n: src / n for n in contents},
            model_card={"release_id": release_id, "task": "breast_cancer_mlp",
                        "intended_use": "Research demo only.",
                        "metrics": {"site-a": {"accuracy": 0.95}}},
            private_key=private_key or keys.private,
        )

    return make


def _verify(bundle: Path, keys: Keys, **kwargs: Any) -> str:
    """The exact refusal of verify_bundle."""
    with pytest.raises(BundleVerificationError) as info:
        verify_bundle(bundle_dir=bundle, public_key=keys.public, **kwargs)
    return str(info.value)


def _statement(bundle: Path) -> dict[str, Any]:
    sig = json.loads((bundle / "model.sig").read_text())
    statement: dict[str, Any] = json.loads(base64.b64decode(sig["dsseEnvelope"]["payload"]))
    return statement


def _resign(bundle: Path, private_key: Path, statement: dict[str, Any], *,
            keep_hint: bool = True) -> None:
    """Write model.sig for ``statement``, validly signed with ``private_key``."""
    key = serialization.load_pem_private_key(private_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    payload = json.dumps(statement, indent=2).encode()
    ptype = b"application/vnd.in-toto+json"
    pae = b"DSSEv1 %d %s %d %s" % (len(ptype), ptype, len(payload), payload)
    sig = json.loads((bundle / "model.sig").read_text())
    sig["dsseEnvelope"]["payload"] = base64.b64encode(payload).decode()
    sig["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(
        key.sign(pae, ec.ECDSA(hashes.SHA256()))).decode()
    if keep_hint:
        pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        sig["verificationMaterial"]["publicKey"]["hint"] = public_key_fingerprint(pub)
    else:
        del sig["verificationMaterial"]["publicKey"]["hint"]
    (bundle / "model.sig").write_text(json.dumps(sig))


# --------------------------------------------------------------------------- good bundles


def test_a_good_bundle_verifies(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    verified = verify_bundle(bundle_dir=bundle, public_key=keys.public)
    assert verified.release_id == RELEASE
    assert sorted(verified.files) == ["model.bin", "model.onnx", "model.xml",
                                      "model_card.json", "model_card.md"]
    assert verified.key_fingerprint == keys.fingerprint
    assert verified.model_card["metrics"] == {"site-a": {"accuracy": 0.95}}
    assert verified.read_verified("model.onnx") == (bundle / "model.onnx").read_bytes()
    assert "# Model release rel-1" in (bundle / "model_card.md").read_text()
    # The key hint model-signing writes is the fingerprint the portal shows.
    sig = json.loads((bundle / "model.sig").read_text())
    assert sig["verificationMaterial"]["publicKey"]["hint"] == keys.fingerprint
    assert _statement(bundle)["subject"][0]["name"] == RELEASE  # not the temp folder's name


def test_release_key_files(keys: Keys) -> None:
    assert stat.S_IMODE(keys.private.stat().st_mode) == 0o600
    assert keys.public.name == "release.pub.pem"
    assert len(keys.fingerprint) == 64
    with pytest.raises(FileExistsError):
        generate_release_key(keys.private)


def test_the_standard_model_signing_tool_accepts_a_good_bundle(make_bundle: MakeBundle,
                                                               keys: Keys) -> None:
    bundle = make_bundle()
    tool = Path(sys.executable).parent / "model_signing"
    cmd = [str(tool), "verify", "key", str(bundle), "--signature", str(bundle / "model.sig"),
           "--public_key", str(keys.public)]
    good = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "Verification succeeded" in good.stdout
    (bundle / "model.bin").write_bytes(b"tampered")
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode != 0


# --------------------------------------------------------------------------- tampering


def test_one_byte_of_a_weight_file_changed(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    weights = bytearray((bundle / "model.bin").read_bytes())
    weights[100] ^= 0x01
    (bundle / "model.bin").write_bytes(bytes(weights))
    assert _verify(bundle, keys) == "digest mismatch: model.bin changed since it was signed"


def test_one_line_of_the_manifest_edited(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    sig = json.loads((bundle / "model.sig").read_text())
    lines = base64.b64decode(sig["dsseEnvelope"]["payload"]).decode().splitlines()
    i = next(i for i, line in enumerate(lines) if '"digest": "' in line)
    last = lines[i].rstrip(",").rstrip('"')[-1]
    lines[i] = lines[i].replace(f'{last}"', f'{"0" if last != "0" else "1"}"')
    sig["dsseEnvelope"]["payload"] = base64.b64encode("\n".join(lines).encode()).decode()
    (bundle / "model.sig").write_text(json.dumps(sig))
    assert _verify(bundle, keys) == (
        f"bad signature: model.sig does not verify with the release key "
        f"({keys.fingerprint[:16]})")


def test_the_signature_value_edited(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    sig = json.loads((bundle / "model.sig").read_text())
    raw = bytearray(base64.b64decode(sig["dsseEnvelope"]["signatures"][0]["sig"]))
    raw[20] ^= 0x01
    sig["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(raw)).decode()
    (bundle / "model.sig").write_text(json.dumps(sig))
    assert _verify(bundle, keys) == (
        f"bad signature: model.sig does not verify with the release key "
        f"({keys.fingerprint[:16]})")


def test_an_extra_file(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    (bundle / "notes.txt").write_text("hello")
    assert _verify(bundle, keys) == "extra file not in the signed manifest: notes.txt"


def test_an_extra_git_file_that_the_standard_tool_would_ignore(make_bundle: MakeBundle,
                                                              keys: Keys) -> None:
    bundle = make_bundle()
    (bundle / ".gitattributes").write_text("*.onnx filter=lfs")
    assert _verify(bundle, keys) == "extra file not in the signed manifest: .gitattributes"


def test_an_extra_folder(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    (bundle / "plugins").mkdir()
    assert _verify(bundle, keys) == "extra folder not in the signed manifest: plugins"


def test_a_missing_file(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    (bundle / "model.xml").unlink()
    assert _verify(bundle, keys) == "missing file: model.xml"


def test_a_missing_signature(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    (bundle / "model.sig").unlink()
    assert _verify(bundle, keys) == "unsigned bundle: model.sig is missing"


def test_a_garbled_signature_file(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    (bundle / "model.sig").write_text("{not json")
    assert _verify(bundle, keys) == "model.sig is malformed"


def signed_list(path: Path, keys: Keys, *revoked: str) -> Path:
    """A revocation list signed with ``keys`` (as the coordinator serves it) at ``path``."""
    doc = sign_revocations(revoked=[{"release_id": r, "reason": "bad AUC"} for r in revoked],
                           private_key=keys.private, issued_at=datetime.now(UTC))
    path.write_text(json.dumps(doc))
    return path


def test_a_revoked_release(make_bundle: MakeBundle, keys: Keys, tmp_path: Path) -> None:
    bundle = make_bundle()
    assert _verify(bundle, keys, revoked={RELEASE, "rel-0"}) == "release rel-1 is revoked"
    rev = signed_list(tmp_path / "revocations.json", keys, RELEASE)
    listed = load_revocations(rev, public_key=keys.public)
    assert _verify(bundle, keys, revoked=listed.revoked) == "release rel-1 is revoked"
    verify_bundle(bundle_dir=bundle, public_key=keys.public, revoked={"rel-0"})


def test_an_unreadable_revocation_list_fails_closed(tmp_path: Path, keys: Keys) -> None:
    bad = tmp_path / "revocations.json"
    bad.write_text("{not json")
    with pytest.raises(BundleVerificationError, match="is not JSON"):
        load_revocations(bad, public_key=keys.public)
    with pytest.raises(BundleVerificationError, match="cannot read the revocation list"):
        load_revocations(tmp_path / "absent.json", public_key=keys.public)


def test_another_release_than_expected(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    assert _verify(bundle, keys, release_id="rel-2") == (
        "bundle is release rel-1, expected release rel-2")


def test_a_signature_by_another_key(make_bundle: MakeBundle, keys: Keys,
                                    other_keys: Keys) -> None:
    bundle = make_bundle(private_key=other_keys.private)
    assert _verify(bundle, keys) == (
        f"bad signature: signed by another key ({other_keys.fingerprint[:16]}), not the "
        f"release key ({keys.fingerprint[:16]})")


def test_a_signature_by_another_key_without_a_key_hint(make_bundle: MakeBundle, keys: Keys,
                                                       other_keys: Keys) -> None:
    bundle = make_bundle()
    _resign(bundle, other_keys.private, _statement(bundle), keep_hint=False)
    assert _verify(bundle, keys) == (
        f"bad signature: model.sig does not verify with the release key "
        f"({keys.fingerprint[:16]})")


def test_a_symlink_pointing_out_of_the_bundle(make_bundle: MakeBundle, keys: Keys,
                                              tmp_path: Path) -> None:
    bundle = make_bundle()
    outside = tmp_path / "outside.bin"
    outside.write_bytes((bundle / "model.bin").read_bytes())  # same bytes, still refused
    (bundle / "model.bin").unlink()
    (bundle / "model.bin").symlink_to(outside)
    assert _verify(bundle, keys) == f"symlink in bundle: model.bin -> {outside}"


def test_a_symlink_inside_the_bundle(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    (bundle / "alias.onnx").symlink_to("model.onnx")
    assert _verify(bundle, keys) == "symlink in bundle: alias.onnx -> model.onnx"


def test_a_bundle_path_that_is_a_symlink(make_bundle: MakeBundle, keys: Keys,
                                         tmp_path: Path) -> None:
    bundle = make_bundle()
    link = tmp_path / "current"
    link.symlink_to(bundle)
    assert _verify(link, keys) == f"bundle path {link} is a symlink"


@pytest.mark.parametrize(("entry", "why"), [
    ("../outside.bin", "contains '..'"),
    ("/etc/passwd", "is an absolute path"),
    ("sub/../../x", "contains '..'"),
])
def test_a_signed_manifest_entry_outside_the_bundle(make_bundle: MakeBundle, keys: Keys,
                                                    entry: str, why: str) -> None:
    bundle = make_bundle()
    statement = _statement(bundle)
    statement["predicate"]["resources"].append(
        {"name": entry, "digest": "0" * 64, "algorithm": "sha256"})
    _resign(bundle, keys.private, statement)  # validly signed, still refused
    assert _verify(bundle, keys) == (
        f"manifest entry {entry!r} is not a plain relative path inside the bundle ({why})")


def test_a_signature_that_ignores_more_files(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    statement = _statement(bundle)
    statement["predicate"]["serialization"]["ignore_paths"].append("model.bin")
    _resign(bundle, keys.private, statement)
    assert _verify(bundle, keys).startswith("unsupported signature: serialization ")


def test_a_file_swapped_after_verification(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    verified = verify_bundle(bundle_dir=bundle, public_key=keys.public)
    (bundle / "model.onnx").write_bytes(b"swapped")
    with pytest.raises(BundleVerificationError) as info:
        verified.read_verified("model.onnx")
    assert str(info.value) == "digest mismatch: model.onnx changed since it was verified"


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize(("name", "why"), [
    ("../evil.onnx", "'../evil.onnx' contains '..'"),
    ("/tmp/evil.onnx", "'/tmp/evil.onnx' is an absolute path"),
    ("model.sig", "'model.sig' is reserved for the bundle itself"),
    (".hidden", "'.hidden' has an empty, hidden or unsafe path component"),
])
def test_bad_file_names_are_refused_at_write_time(make_bundle: MakeBundle, tmp_path: Path,
                                                  name: str, why: str) -> None:
    src = tmp_path / "x.onnx"
    src.write_bytes(b"x")
    with pytest.raises(BundleWriteError) as info:
        make_bundle(files={name: src})
    assert str(info.value) == f"file names must be plain relative paths inside the bundle: {why}"
    assert not (tmp_path / "releases").exists() or not any((tmp_path / "releases").iterdir())


def test_nested_file_names_are_fine(make_bundle: MakeBundle, keys: Keys, tmp_path: Path) -> None:
    src = tmp_path / "x.png"
    src.write_bytes(b"png")
    bundle = make_bundle(files={"plots/training_curve.png": src})
    verified = verify_bundle(bundle_dir=bundle, public_key=keys.public)
    assert "plots/training_curve.png" in verified.files


def test_an_existing_bundle_is_never_overwritten(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    before = (bundle / "model.sig").read_bytes()
    with pytest.raises(BundleWriteError) as info:
        make_bundle()
    assert str(info.value) == f"refusing to overwrite existing bundle {bundle}"
    assert (bundle / "model.sig").read_bytes() == before


def test_a_crash_while_signing_leaves_no_bundle(make_bundle: MakeBundle, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(folder: Path, private_key: Path) -> None:
        (folder / "model.sig").write_text("half")  # a partial write, then the crash
        raise RuntimeError("simulated crash while signing")

    monkeypatch.setattr(bundle_mod, "_sign_folder", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_bundle()
    releases = tmp_path / "releases"
    assert not (releases / RELEASE).exists()
    assert list(releases.iterdir()) == []  # the temporary folder was removed


def test_a_killed_writer_leaves_only_a_clearly_named_temp_folder(keys: Keys,
                                                                 tmp_path: Path) -> None:
    src = tmp_path / "model.onnx"
    src.write_bytes(b"weights")
    out = tmp_path / "releases" / RELEASE
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from export import bundle
        def die(folder, private_key):
            os._exit(9)  # like SIGKILL: no cleanup runs
        bundle._sign_folder = die
        bundle.write_bundle(out_dir=Path({str(out)!r}), files={{"model.onnx": Path({str(src)!r})}},
                            model_card={{"release_id": "{RELEASE}"}},
                            private_key=Path({str(keys.private)!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 9, done.stderr
    assert not out.exists()
    (leftover,) = list(out.parent.iterdir())
    assert leftover.name.startswith(f".tmp-{RELEASE}-")
    assert _verify(out, keys) == f"bundle folder {out} does not exist"


# --------------------------------------------------------------------------- fedward-verify


def test_verify_command(make_bundle: MakeBundle, keys: Keys, tmp_path: Path) -> None:
    bundle = make_bundle()
    runner = CliRunner(env={"FEDWARD_COORDINATOR": None})
    current = signed_list(tmp_path / "current.json", keys, "rel-0")
    ok = runner.invoke(verify_app, [str(bundle), "--public-key", str(keys.public),
                                    "--revocations", str(current)])
    assert ok.exit_code == 0, ok.output
    assert ok.stdout.startswith("verified: release rel-1, 5 files, not revoked as of ")

    rev = signed_list(tmp_path / "revocations.json", keys, RELEASE)
    revoked = runner.invoke(verify_app, [str(bundle), "--public-key", str(keys.public),
                                         "--revocations", str(rev)])
    assert revoked.exit_code == 1
    assert "verification failed: release rel-1 is revoked" in revoked.stderr

    (bundle / "model.onnx").write_bytes(b"tampered")
    bad = runner.invoke(verify_app, [str(bundle), "--public-key", str(keys.public),
                                     "--revocations", str(current)])
    assert bad.exit_code == 1
    assert ("verification failed: digest mismatch: model.onnx changed since it was signed"
            in bad.stderr)


def test_verify_checks_revocation_by_default(make_bundle: MakeBundle, keys: Keys) -> None:
    bundle = make_bundle()
    runner = CliRunner(env={"FEDWARD_COORDINATOR": None})
    unknown = runner.invoke(verify_app, [str(bundle), "--public-key", str(keys.public)])
    assert unknown.exit_code == 1
    assert ("verification failed: the release's revocation status is unknown: give "
            "--coordinator URL" in unknown.stderr)
    assert "--unsafe-skip-revocation-check" in unknown.stderr


def test_the_unsafe_flag_skips_revocation_and_warns(make_bundle: MakeBundle,
                                                    keys: Keys) -> None:
    bundle = make_bundle()
    runner = CliRunner(env={"FEDWARD_COORDINATOR": None})
    skipped = runner.invoke(verify_app, [str(bundle), "--public-key", str(keys.public),
                                         "--unsafe-skip-revocation-check"])
    assert skipped.exit_code == 0, skipped.output
    assert skipped.stdout.strip() == "verified (revocation not checked): release rel-1, 5 files"
    assert UNSAFE_SKIP_WARNING in skipped.stderr
    both = runner.invoke(verify_app, [str(bundle), "--public-key", str(keys.public),
                                      "--unsafe-skip-revocation-check", "--coordinator",
                                      "https://coordinator.example"])
    assert both.exit_code == 1
    assert "give only one of --coordinator, --revocations and" in both.stderr


def test_the_guides_model_signing_command_refuses_an_added_git_file(
        make_bundle: MakeBundle, keys: Keys) -> None:
    """The standard tool skips .git* files unless told not to: the guide tells it not to."""
    bundle = make_bundle()
    (bundle / ".gitattributes").write_text("*.onnx filter=lfs")
    tool = Path(sys.executable).parent / "model_signing"
    cmd = [str(tool), "verify", "key", str(bundle), "--signature", str(bundle / "model.sig"),
           "--public_key", str(keys.public)]
    default = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert default.returncode == 0  # the tool's default: the added file is not looked at
    guide = subprocess.run([*cmd, "--no-ignore-git-paths"], capture_output=True, text=True,
                           timeout=60, check=False)
    assert guide.returncode != 0, guide.stdout


def test_every_guide_that_names_model_signing_gives_the_flag_and_says_it_skips_revocation(
        ) -> None:
    """Wherever a guide names the standard tool it gives the whole command the test above
    runs (with ``--no-ignore-git-paths``) and says the tool checks no revocation, so no
    reader takes it for ``fedward-verify``."""
    import re

    docs = Path(__file__).resolve().parents[1] / "docs"
    named = 0
    for guide in sorted(docs.glob("*.md")):
        # Paragraphs, joined into one line each, so that a command wrapped in the text counts.
        for paragraph in re.split(r"\n\s*\n", guide.read_text(encoding="utf-8")):
            text = " ".join(paragraph.replace("*", "").split())
            for command in re.findall(r"`(model_signing verify[^`]*)`", text):
                named += 1
                where = f"{guide.name}: `{command}`"
                assert command.split()[:3] == ["model_signing", "verify", "key"], where
                for flag in ("--signature", "--public_key", "--no-ignore-git-paths"):
                    assert flag in command.split(), f"{where} lacks {flag}"
                assert "not check revocation" in text or "no revocation" in text, (
                    f"{guide.name}: the paragraph naming `model_signing` must say that it "
                    "checks no revocation")
    assert named >= 2, "the clinician's and the ML team's guides name model_signing"
