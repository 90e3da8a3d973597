"""The base distribution is the clinician's install: verify and serve, no training stack.

`pip install fedward` (no extra) must give `fedward-verify` and `fedward-serve` working on a
real signed bundle without torch, Flower, Opacus or OpenVINO; the training stack comes with
`fedward[site]` / `fedward[coordinator]`. The test installs the project into a fresh venv
(dependencies from the package registry or pip's cache), checks what got installed, verifies
a bundle signed here and serves one prediction from it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import pytest

from export.bundle import write_bundle
from export.bundle_keys import generate_release_key, public_key_path
from export.onnx_export import export_onnx
from export.revocations import sign_revocations
from fedward.tasks import build_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings(
        r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"),
]

ROOT = Path(__file__).resolve().parents[1]
TRAINING_STACK = ("torch", "flwr", "opacus", "openvino", "dp-accounting", "scikit-learn")
INSTALL_TIMEOUT_S = 240
WHEELS = ROOT / ".venv" / "clinician-wheels"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _source_tree(dest: Path) -> Path:
    """The files git would ship (tracked and not ignored), copied: no venvs, no outputs."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "-co",
                             "--exclude-standard"], capture_output=True, check=True,
                            timeout=60).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = ROOT / name
        if src.is_file() and not src.is_symlink():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with the project installed without extras (as a clinician would)."""
    if not (WHEELS / ".complete").is_file():
        pytest.fail(f"{WHEELS} is missing: run `make clinician-wheels` (make test does)")
    work = tmp_path_factory.mktemp("clinician")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PIP_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_CONFIG_FILE"] = os.devnull
    # Offline, from the wheels `make clinician-wheels` fetched: the same resolution as
    # `pip install fedward` from the registry, without its minutes of downloads.
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index",
                           "--find-links", str(WHEELS), str(_source_tree(work / "src"))],
                          capture_output=True, text=True, env=env, timeout=INSTALL_TIMEOUT_S)
    assert done.returncode == 0, f"base install failed:\n{done.stdout}\n{done.stderr}"
    return venv


def _installed(venv: Path) -> set[str]:
    out = subprocess.run([str(venv / "bin" / "pip"), "list", "--format", "json"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return {p["name"].lower().replace("_", "-") for p in json.loads(out)}


def test_the_base_install_has_no_training_stack(clean_venv: Path) -> None:
    installed = _installed(clean_venv)
    assert "fedward" in installed
    assert not [p for p in TRAINING_STACK if p in installed], sorted(installed)
    probe = subprocess.run(
        [str(clean_venv / "bin" / "python"), "-c",
         "import importlib.util as u; print([m for m in ('torch', 'flwr', 'opacus', "
         "'openvino') if u.find_spec(m)])"],
        capture_output=True, text=True, check=True, timeout=60, cwd="/")
    assert probe.stdout.strip() == "[]"


@pytest.fixture
def signed_bundle(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(bundle, public key, signed revocation list) made with the full install."""
    private = tmp_path / "keys" / "release.pem"
    private.parent.mkdir()
    generate_release_key(private)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx = export_onnx(model=build_model("breast_cancer_mlp", seed=0),
                           task="breast_cancer_mlp", out_dir=tmp_path / "onnx")
    bundle = write_bundle(out_dir=tmp_path / "rel-pkg", files={"model.onnx": onnx},
                          model_card={"release_id": "rel-pkg", "task": "breast_cancer_mlp"},
                          private_key=private)
    listing = tmp_path / "revocations.json"
    listing.write_text(json.dumps(sign_revocations(revoked=[], private_key=private,
                                                   issued_at=datetime.now(UTC))))
    return bundle, public_key_path(private), listing


def test_the_clinician_tools_verify_and_serve_without_the_training_stack(
        clean_venv: Path, signed_bundle: tuple[Path, Path, Path], tmp_path: Path) -> None:
    bundle, public, listing = signed_bundle
    bin_ = clean_venv / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    verified = subprocess.run(
        [str(bin_ / "fedward-verify"), str(bundle), "--public-key", str(public),
         "--revocations", str(listing)],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert verified.returncode == 0, verified.stderr
    assert "verified: release rel-pkg" in verified.stdout
    for program in ("fedward-verify", "fedward-serve"):
        shown = subprocess.run([str(bin_ / program), "--version"], capture_output=True,
                               text=True, env=env, timeout=120, cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.startswith(f"{program} ") and "(commit " in shown.stdout, \
            shown.stdout

    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(bin_ / "fedward-serve"), "--bundle", str(bundle), "--public-key", str(public),
         "--revocations", str(listing), "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        answer = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/predict", timeout=5,
                                    json={"instances": [np.zeros(30).tolist()]})
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert answer is not None, (tmp_path / "serve.log").read_text()
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["release_id"] == "rel-pkg"
        assert len(body["predictions"]) == 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)
        log.close()
