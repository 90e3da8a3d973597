"""Tests of export.serve: the local inference service serves only a verified bundle."""

from __future__ import annotations

import base64
import json
import logging
import subprocess
import sys
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer
from typer.testing import CliRunner

from export.bundle import write_bundle
from export.bundle_format import BundleVerificationError
from export.bundle_keys import generate_release_key, public_key_path
from export.onnx_export import export_onnx
from export.revocations import RevocationSource, sign_revocations
from export.serve import cli as serve_cli
from export.serve import create_app
from fedward.tasks import build_model

with warnings.catch_warnings():
    # Import-time deprecation notices of the pinned Starlette (it prefers httpx2 to httpx,
    # and annotates with an anyio alias that anyio 4.16 deprecates), as in
    # api_support.
    warnings.filterwarnings(
        "ignore", message="Using `httpx` with `starlette.testclient` is deprecated"
    )
    warnings.filterwarnings("ignore", message="The anyio.abc.BlockingPortal alias")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings(
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning"
)

RELEASE = "rel-1"
# Only for tests about something else than revocation: the check is skipped, knowingly.
SKIP = RevocationSource(unsafe_skip=True)


@pytest.fixture(scope="module")
def artefact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = build_model("breast_cancer_mlp", seed=0)
    return export_onnx(model=model, task="breast_cancer_mlp",
                       out_dir=tmp_path_factory.mktemp("onnx")), model


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    private = tmp_path_factory.mktemp("keys") / "release.pem"
    generate_release_key(private)
    return private, public_key_path(private)


MakeBundle = Callable[[], Path]


@pytest.fixture
def make_bundle(tmp_path: Path, artefact: tuple[Path, torch.nn.Module],
                keys: tuple[Path, Path]) -> MakeBundle:
    def make() -> Path:
        return write_bundle(out_dir=tmp_path / RELEASE, files={"model.onnx": artefact[0]},
                            model_card={"release_id": RELEASE, "task": "breast_cancer_mlp"},
                            private_key=keys[0])

    return make


def write_list(path: Path, keys: tuple[Path, Path], *revoked: str) -> Path:
    """Write a revocation list signed with the release key, as the coordinator serves it."""
    path.write_text(json.dumps(sign_revocations(
        revoked=[{"release_id": r, "reason": "AUC drop at site B"} for r in revoked],
        private_key=keys[0], issued_at=datetime.now(UTC))))
    return path


@pytest.fixture
def revocations(tmp_path: Path, keys: tuple[Path, Path]) -> Path:
    return write_list(tmp_path / "revocations.json", keys)


@pytest.fixture
def rows() -> list[list[float]]:
    return [[float(v) for v in row] for row in load_breast_cancer().data[:5]]


def _refusal(bundle: Path, public_key: Path, revocations: Path | None = None) -> str:
    """The exact reason create_app refuses to start."""
    source = SKIP if revocations is None else RevocationSource(path=revocations)
    with pytest.raises(BundleVerificationError) as info:
        create_app(bundle_dir=bundle, public_key=public_key, revocations=source)
    return str(info.value)


def test_a_good_bundle_serves_predictions(make_bundle: MakeBundle, keys: tuple[Path, Path],
                                          revocations: Path, rows: list[list[float]],
                                          artefact: tuple[Path, torch.nn.Module]) -> None:
    app = create_app(bundle_dir=make_bundle(), public_key=keys[1],
                     revocations=RevocationSource(path=revocations))
    client = TestClient(app)
    assert client.get("/health").json() == {
        "status": "ok", "release_id": RELEASE, "reason": None,
        "drift": "drift not scored: release rel-1 has no reference_statistics.json (trained "
                 "without the statistics phase)",
        # This card names no input columns: rows only (tests/test_serve_records.py).
        "records": "records by name: not for this release (its card does not name the "
                   "model's input columns)"}
    res = client.post("/predict", json={"instances": rows})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["release_id"] == RELEASE
    with torch.no_grad():
        expected = artefact[1](torch.tensor(rows, dtype=torch.float32)).argmax(1).tolist()
    assert body["predictions"] == expected
    probs = np.asarray(body["probabilities"])
    assert probs.shape == (5, 2) and np.allclose(probs.sum(axis=1), 1.0)


def test_a_tampered_bundle_refuses_to_start(make_bundle: MakeBundle,
                                            keys: tuple[Path, Path]) -> None:
    bundle = make_bundle()
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[-10] ^= 0x01
    (bundle / "model.onnx").write_bytes(bytes(data))
    assert _refusal(bundle, keys[1]) == "digest mismatch: model.onnx changed since it was signed"


def test_an_unsigned_bundle_refuses_to_start(make_bundle: MakeBundle,
                                             keys: tuple[Path, Path]) -> None:
    bundle = make_bundle()
    (bundle / "model.sig").unlink()
    assert _refusal(bundle, keys[1]) == "unsigned bundle: model.sig is missing"


def test_a_revoked_bundle_refuses_to_start(make_bundle: MakeBundle, keys: tuple[Path, Path],
                                           revocations: Path) -> None:
    write_list(revocations, keys, RELEASE)
    assert _refusal(make_bundle(), keys[1], revocations) == "release rel-1 is revoked"


def test_revocation_then_reload_stops_predictions(make_bundle: MakeBundle,
                                                  keys: tuple[Path, Path],
                                                  revocations: Path,
                                                  rows: list[list[float]]) -> None:
    client = TestClient(create_app(bundle_dir=make_bundle(), public_key=keys[1],
                                   revocations=RevocationSource(path=revocations)))
    assert client.post("/predict", json={"instances": rows}).status_code == 200

    write_list(revocations, keys, RELEASE)
    res = client.post("/reload")
    assert res.status_code == 503
    assert res.json()["detail"] == "not serving: release rel-1 is revoked"
    res = client.post("/predict", json={"instances": rows})
    assert res.status_code == 503 and "revoked" in res.json()["detail"]
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable", "release_id": None,
                             "reason": "release rel-1 is revoked", "drift": None,
                             "records": None}

    # Lifting the revocation needs an explicit, successful reload.
    write_list(revocations, keys)
    assert client.post("/predict", json={"instances": rows}).status_code == 503
    res = client.post("/reload")
    assert res.status_code == 200
    assert res.json() == {"status": "ok", "release_id": RELEASE, "files": 3}
    assert client.post("/predict", json={"instances": rows}).status_code == 200


def test_tampering_after_start_stops_predictions_at_reload(make_bundle: MakeBundle,
                                                           keys: tuple[Path, Path],
                                                           rows: list[list[float]]) -> None:
    bundle = make_bundle()
    client = TestClient(create_app(bundle_dir=bundle, public_key=keys[1],
                                   revocations=SKIP))
    (bundle / "extra.onnx").write_bytes(b"not signed")
    res = client.post("/reload")
    assert res.status_code == 503
    assert res.json()["detail"] == (
        "not serving: extra file not in the signed manifest: extra.onnx")
    assert client.post("/predict", json={"instances": rows}).status_code == 503


def test_a_missing_revocation_list_at_reload_fails_closed(make_bundle: MakeBundle,
                                                          keys: tuple[Path, Path],
                                                          revocations: Path) -> None:
    client = TestClient(create_app(bundle_dir=make_bundle(), public_key=keys[1],
                                   revocations=RevocationSource(path=revocations)))
    revocations.unlink()
    res = client.post("/reload")
    assert res.status_code == 503
    assert res.json()["detail"].startswith("not serving: cannot read the revocation list")


@pytest.mark.parametrize(("body", "detail_part"), [
    ({"instances": [[1.0] * 29]}, "each instance needs 30 features; instance(s) 0 have 29"),
    ({"instances": [[1.0] * 30, [1.0] * 31]},
     "each instance needs 30 features; instance(s) 1 have 31"),
    ({"instances": []}, "at least 1 item"),
    ({"instances": [["a"] * 30]}, "valid number"),
    ({"rows": [[1.0] * 30]}, "Extra inputs are not permitted"),
    ({}, "send either instances"),
    # A missing value (null) where the model imputes nothing: named, not run as NaN.
    ({"instances": [[1.0] * 30, [1.0] * 3 + [None] * 27]},
     "instance 1: column 3 is missing (null) and this model does not impute it (27 such "
     "value(s)); give its value (this model imputes no missing value)"),
])
def test_bad_requests_get_422(make_bundle: MakeBundle, keys: tuple[Path, Path],
                              body: dict[str, object], detail_part: str) -> None:
    client = TestClient(create_app(bundle_dir=make_bundle(), public_key=keys[1],
                                   revocations=SKIP))
    res = client.post("/predict", json=body)
    assert res.status_code == 422
    assert detail_part in res.text


@pytest.mark.parametrize("value", ["NaN", "Infinity", "1e39"])
def test_non_finite_values_get_422(make_bundle: MakeBundle, keys: tuple[Path, Path],
                                   value: str) -> None:
    client = TestClient(create_app(bundle_dir=make_bundle(), public_key=keys[1],
                                   revocations=SKIP))
    row = ", ".join(["1.0"] * 29 + [value])
    res = client.post("/predict", content=f'{{"instances": [[{row}]]}}',
                      headers={"content-type": "application/json"})
    assert res.status_code == 422, res.text


def test_the_serve_command_refuses_a_tampered_bundle(make_bundle: MakeBundle,
                                                     keys: tuple[Path, Path]) -> None:
    bundle = make_bundle()
    (bundle / "model_card.md").write_text("edited")
    res = CliRunner().invoke(serve_cli, ["--bundle", str(bundle), "--public-key",
                                         str(keys[1]), "--unsafe-skip-revocation-check"])
    assert res.exit_code == 1
    assert ("refusing to start: digest mismatch: model_card.md changed since it was signed"
            in res.stderr)


def test_an_unsigned_or_altered_revocation_list_is_refused(
        make_bundle: MakeBundle, keys: tuple[Path, Path], revocations: Path) -> None:
    bundle = make_bundle()
    revocations.write_text(json.dumps({"revoked": []}))  # what earlier versions served
    assert _refusal(bundle, keys[1], revocations).startswith(
        f"the revocation list {revocations} is not signed")
    doc = sign_revocations(revoked=[{"release_id": RELEASE, "reason": "recalled"}],
                           private_key=keys[0], issued_at=datetime.now(UTC))
    sig = bytearray(base64.b64decode(doc["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[-1] ^= 0x01
    doc["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    revocations.write_text(json.dumps(doc))
    assert _refusal(bundle, keys[1], revocations).startswith("bad signature: the "
                                                             "revocation list")


def test_the_serve_command_needs_a_revocation_source(make_bundle: MakeBundle,
                                                     keys: tuple[Path, Path]) -> None:
    res = CliRunner(env={"FEDWARD_COORDINATOR": None}).invoke(
        serve_cli, ["--bundle", str(make_bundle()), "--public-key", str(keys[1])])
    assert res.exit_code == 1
    assert "refusing to start: the release's revocation status is unknown" in res.stderr


def test_skipping_the_revocation_check_serves_with_a_warning(
        make_bundle: MakeBundle, keys: tuple[Path, Path], rows: list[list[float]],
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="export.serve"):
        client = TestClient(create_app(bundle_dir=make_bundle(), public_key=keys[1],
                                       revocations=SKIP))
    assert client.post("/predict", json={"instances": rows}).status_code == 200
    assert "WARNING: revocation NOT checked (--unsafe-skip-revocation-check)" in caplog.text


def test_the_service_does_not_import_torch() -> None:
    code = "import sys, export.serve; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode == 0


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_answers_name_classes_and_warn_on_implausible_inputs(
        make_bundle: MakeBundle, keys: tuple[Path, Path], rows: list[list[float]]) -> None:
    client = TestClient(create_app(bundle_dir=make_bundle(), public_key=keys[1],
                                   revocations=SKIP))
    res = client.post("/predict", json={"instances": rows})
    body = res.json()
    assert body["warnings"] == []
    assert body["classes"] == [["malignant", "benign"][c] for c in body["predictions"]]
    odd = [list(rows[0]), list(rows[1])]
    odd[0][0] = 987.654      # mean_radius, plausible up to 2 x 28.11
    odd[1][3] = -12.5        # mean_area below 0
    body = client.post("/predict", json={"instances": odd}).json()
    assert body["warnings"] == [
        "instance 0: mean_radius is outside the plausible range [0, 56.22]; check the value "
        "and its unit",
        "instance 1: mean_area is outside the plausible range [0, 5002]; check the value and "
        "its unit"]
    assert "987" not in json.dumps(body["warnings"])
    assert len(body["predictions"]) == 2     # a warning, not a refusal
    text = client.get("/metrics").text
    s = _samples(text)
    assert s[("fedward_serve_out_of_range_inputs_total", (("feature", "mean_radius"),))] == 1
    assert s[("fedward_serve_out_of_range_inputs_total", (("feature", "mean_area"),))] == 1
    assert s[("fedward_serve_predictions_total", ())] == 7
    assert s[("fedward_serve_predict_duration_seconds_count", ())] == 2
    assert s[("fedward_serve_serving", ())] == 1
    assert s[("fedward_serve_release_info", (("release_id", RELEASE),))] == 1
    # Metrics never carry an input value or a path.
    assert "987.654" not in text and "12.5" not in text and str(keys[1].parent) not in text
    assert f"{rows[0][1]:g}" not in text


def test_many_implausible_values_are_summarised(make_bundle: MakeBundle,
                                                keys: tuple[Path, Path]) -> None:
    client = TestClient(create_app(bundle_dir=make_bundle(), public_key=keys[1],
                                   revocations=SKIP))
    body = client.post("/predict", json={"instances": [[-1.0] * 30] * 2}).json()
    assert len(body["warnings"]) == 21
    assert body["warnings"][-1] == "... and 40 more values outside their range"


def test_refusals_are_counted_by_reason(make_bundle: MakeBundle, keys: tuple[Path, Path],
                                        tmp_path: Path, rows: list[list[float]]) -> None:
    bundle = make_bundle()
    client = TestClient(create_app(bundle_dir=bundle, public_key=keys[1],
                                   revocations=RevocationSource(
                                       path=write_list(tmp_path / "r.json", keys))))
    assert client.post("/predict", json={"instances": [[1.0, 2.0]]}).status_code == 422
    assert client.post("/predict", json={"instances": []}).status_code == 422
    write_list(tmp_path / "r.json", keys, RELEASE)
    assert client.post("/reload").status_code == 503
    assert client.post("/predict", json={"instances": rows}).status_code == 503
    s = _samples(client.get("/metrics").text)
    assert s[("fedward_serve_refusals_total", (("reason", "feature-count"),))] == 1
    assert s[("fedward_serve_refusals_total", (("reason", "invalid-request"),))] == 1
    assert s[("fedward_serve_refusals_total", (("reason", "not-serving"),))] == 1
    assert s[("fedward_serve_serving", ())] == 0
    assert ("fedward_serve_release_info", (("release_id", RELEASE),)) not in s


def test_a_digits_model_answers_each_digit_by_its_name_and_warns_on_a_pixel(
        tmp_path: Path, keys: tuple[Path, Path]) -> None:
    model = build_model("digits_cnn", seed=0)
    onnx = export_onnx(model=model, task="digits_cnn", out_dir=tmp_path / "onnx")
    bundle = write_bundle(out_dir=tmp_path / "digits", files={"model.onnx": onnx},
                          model_card={"release_id": "rel-d", "task": "digits_cnn"},
                          private_key=keys[0])
    client = TestClient(create_app(bundle_dir=bundle, public_key=keys[1], revocations=SKIP))
    body = client.post("/predict", json={"instances": [[3.0] * 63 + [17.0]]}).json()
    # The digits study names its classes "0" to "9": the name is the digit predicted.
    assert body["classes"] == [str(body["predictions"][0])]
    assert body["warnings"] == ["instance 0: pixel_63 is outside the plausible range [0, 16]; "
                                "check the value and its unit"]


@pytest.fixture(scope="module")
def breast_cancer() -> np.ndarray:
    return np.asarray(load_breast_cancer().data, dtype=np.float64)


def _bundle_with_reference(tmp_path: Path, artefact: tuple[Path, torch.nn.Module],
                           keys: tuple[Path, Path], reference: bytes) -> Path:
    """A signed bundle of the breast cancer model that ships ``reference`` as its
    reference_statistics.json."""
    ref = tmp_path / "reference_statistics.json"
    ref.write_bytes(reference)
    return write_bundle(out_dir=tmp_path / RELEASE,
                        files={"model.onnx": artefact[0], "reference_statistics.json": ref},
                        model_card={"release_id": RELEASE, "task": "breast_cancer_mlp"},
                        private_key=keys[0])


def _drift(text: str) -> tuple[float, dict[str, float]]:
    s = _samples(text)
    return s[("fedward_serve_drift_window_rows", ())], {
        dict(labels)["feature"]: v for (name, labels), v in s.items()
        if name == "fedward_serve_drift_psi"}


def test_drift_gauges_score_the_answered_window_against_the_reference(
        tmp_path: Path, artefact: tuple[Path, torch.nn.Module], keys: tuple[Path, Path],
        breast_cancer: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    from drift_support import dp_reference

    from export.serve_drift import MIN_ROWS
    from fedward.drift_psi import PSI_ALARM
    from fedward.tasks import BREAST_CANCER_COLUMNS

    # The study's reference, as the statistics phase makes it: three sites' DP-noised
    # histograms summed, stating the summed noise.
    doc = dp_reference(np.array_split(breast_cancer, 3), noise_std=2.0)
    doc["privacy"]["noise_std"] = 2.0 * np.sqrt(3)
    bundle = _bundle_with_reference(tmp_path, artefact, keys, json.dumps(doc).encode())
    window = 400
    with caplog.at_level(logging.INFO, logger="export.serve"):
        client = TestClient(create_app(bundle_dir=bundle, public_key=keys[1],
                                       revocations=SKIP, drift_window=window))
    assert client.get("/health").json()["drift"].startswith(
        "drift scored: the last 400 answered rows against the release's reference")
    rng = np.random.default_rng(7)
    like = breast_cancer[rng.integers(0, len(breast_cancer), window)]

    def predict(x: np.ndarray) -> None:
        res = client.post("/predict", json={"instances": x.tolist()})
        assert res.status_code == 200, res.text

    predict(like[:MIN_ROWS - 1])
    rows, scores = _drift(client.get("/metrics").text)
    assert rows == MIN_ROWS - 1 and scores == {}      # too few rows to show a PSI
    predict(like[MIN_ROWS - 1:])
    rows, scores = _drift(client.get("/metrics").text)
    assert rows == window and set(scores) == set(BREAST_CANCER_COLUMNS)
    assert max(scores.values()) < 0.1, scores         # drawn like the reference: small

    # The same rows with mean_radius one standard deviation higher replace the window.
    shifted = like.copy()
    shifted[:, 0] += breast_cancer[:, 0].std()
    for part in np.array_split(shifted, 3):
        predict(part)
    rows, scores = _drift(client.get("/metrics").text)
    assert rows == window
    assert scores["mean_radius"] > PSI_ALARM, scores
    assert max(v for k, v in scores.items() if k != "mean_radius") < 0.1, scores
    # A recheck of the same release (a reload, as the revocation schedule does) keeps the
    # window: the scores are the same afterwards.
    assert client.post("/reload").status_code == 200
    assert _drift(client.get("/metrics").text) == (rows, scores)

    # No input value reaches the metrics or the log, only its bin.
    odd = 1234.5678 + np.arange(30) * 0.0101
    predict(odd[None, :])
    text = client.get("/metrics").text
    for v in odd:
        assert f"{v:g}" not in text and f"{v:g}" not in caplog.text
    assert "1234.5" not in text and "1234.5" not in caplog.text


@pytest.mark.parametrize(("reference", "why"), [
    (None, "drift not scored: release rel-1 has no reference_statistics.json (trained "
           "without the statistics phase)"),
    (b"{not json", "drift not scored: the release's reference_statistics.json is not usable: "
                   "not valid JSON"),
])
def test_a_release_without_a_usable_reference_has_no_drift_gauges(
        tmp_path: Path, artefact: tuple[Path, torch.nn.Module], keys: tuple[Path, Path],
        make_bundle: MakeBundle, rows: list[list[float]], reference: bytes | None, why: str,
        caplog: pytest.LogCaptureFixture) -> None:
    bundle = make_bundle() if reference is None else \
        _bundle_with_reference(tmp_path, artefact, keys, reference)
    with caplog.at_level(logging.INFO, logger="export.serve"):
        client = TestClient(create_app(bundle_dir=bundle, public_key=keys[1],
                                       revocations=SKIP))
    assert f"release rel-1: {why}" in caplog.text
    assert client.get("/health").json()["drift"].startswith(why)
    assert client.post("/predict", json={"instances": rows * 50}).status_code == 200
    text = client.get("/metrics").text
    assert "fedward_serve_predictions_total 250.0" in text
    assert "fedward_serve_drift" not in text
    with pytest.raises(ValueError, match="the drift window must hold 200 to 100000 rows"):
        create_app(bundle_dir=bundle, public_key=keys[1], revocations=SKIP, drift_window=199)
