"""Model plugins: the ML team's own model code as an installed distribution.

The example plugin (examples/fedward-example-model) is built into a wheel and installed
with pip into a folder of this test session (never into the shared environment), which the
tests put on ``sys.path`` (and on ``PYTHONPATH`` for the processes of the end-to-end test).
Covers the pin (what is hashed, the wheel's own figure, a changed file), the registration's
DP-SGD check of a plugin, the run's pin, the site's allow-list and admission refusals, the
example package's own tests, and one real federation that trains a plugin study.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner

from coordinator.models import AuditEvent, Study
from fedward.plugins import (
    PluginError,
    PluginPin,
    installed_pin,
    model_plugin_pin,
    wheel_sha256,
)
from fedward.wire import CFG, SiteErrorCode
from site_agent.audit import AuditLog, read_entries
from site_agent.cli import app as site_cli
from site_agent.config import SitePaths
from site_agent.policy import PolicyError, SitePolicy
from site_agent.trainer import WarmTrainer

from api_support import TestClient, api, setup_registered_sites
from site_policy_support import DataGuard, policy_doc, refusal, task_config, write_policy
from study_support import readmission, register

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "fedward-example-model"
DIST = "fedward-example-model"


@dataclass(frozen=True)
class Installed:
    """The example plugin: its wheel, and a folder it is installed in (not on sys.path)."""

    wheel: Path
    target: Path


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "-q", *args], capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """Build the example's wheel and pip-install it into a folder of its own, offline."""
    root = tmp_path_factory.mktemp("plugin")
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = shutil.copytree(EXAMPLE, root / "source", ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"),
         str(source))
    (wheel,) = (root / "dist").glob("fedward_example_model-*.whl")
    _pip("install", "--no-deps", "--no-index", "--no-compile", "--target",
         str(root / "site-packages"), str(wheel))
    return Installed(wheel=wheel, target=root / "site-packages")


@pytest.fixture
def on_path(example: Installed, monkeypatch: pytest.MonkeyPatch) -> Installed:
    monkeypatch.syspath_prepend(str(example.target))
    return example


# --- the pin ---------------------------------------------------------------------------


def test_the_pin_is_the_installed_record_the_same_as_the_wheels_and_a_changed_file_is_named(
        on_path: Installed, tmp_path: Path) -> None:
    pin = model_plugin_pin("residual_mlp")
    assert (pin.distribution, pin.version) == (DIST, "0.1.0")
    # What the site's IT can read from the wheel before installing it is the same figure,
    # and a second install from another path (another direct_url.json) too.
    assert wheel_sha256(on_path.wheel) == pin
    _pip("install", "--no-deps", "--no-index", "--target", str(tmp_path / "again"),
         str(on_path.wheel))
    record = next((tmp_path / "again").glob("*.dist-info/direct_url.json"))
    assert str(on_path.wheel.parent) in record.read_text()
    assert installed_pin(DIST) == pin
    # The command the guides show prints the policy entry.
    out = subprocess.run([sys.executable, "-m", "fedward.plugins", str(on_path.wheel)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out) == {"distribution": DIST, "version": "0.1.0", "sha256": pin.sha256}
    # A file changed after installation is refused, by name, rather than pinned.
    source = on_path.target / "fedward_example_model" / "__init__.py"
    original = source.read_bytes()
    try:
        source.write_bytes(original + b"\n# edited\n")
        with pytest.raises(PluginError, match=r"differs from what was installed "
                                              r"\(fedward_example_model/__init__.py\)"):
            installed_pin(DIST)
    finally:
        source.write_bytes(original)
    with pytest.raises(PluginError, match="no installed distribution provides the model "
                                          "plugin 'no_such_net'"):
        model_plugin_pin("no_such_net")


def test_the_example_plugins_own_tests_pass(example: Installed) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(example.target), str(REPO)]),
           "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(EXAMPLE / "tests")], cwd=EXAMPLE, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 passed" in done.stdout, done.stdout


# --- registration and launch at the coordinator ----------------------------------------


def _bn_distribution(root: Path) -> None:
    """A distribution whose model family keeps BatchNorm (DP-SGD cannot train it)."""
    dist = root / "bn_models-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: bn-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fedward.models]\nbn_mlp = bn_models_mod:build\n")
    (root / "bn_models_mod.py").write_text(
        "from torch import nn\n\n"
        "def build(n_features: int, n_classes: int) -> nn.Module:\n"
        "    return nn.Sequential(nn.Linear(n_features, 8), nn.BatchNorm1d(8), nn.ReLU(),\n"
        "                         nn.Linear(8, n_classes))\n")


def test_registration_builds_the_plugin_and_refuses_batchnorm_naming_the_layer(
    client: TestClient, token_for: Callable[..., dict[str, str]],
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    _bn_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    eng = token_for("ml_engineer")
    doc = readmission(model={"family": "plugin", "name": "bn_mlp",
                             "params": {"n_features": 6, "n_classes": 2}})
    doc["features"][0]["range"] = [100, 18]   # another problem of the same spec
    r = register(client, eng, spec=doc)
    assert r.status_code == 422, r.text
    message = r.json()["message"]
    assert "range low 100.0 must be below high 18.0" in message
    assert "layer '1' (BatchNorm1d) cannot be trained with DP-SGD: BatchNorm cannot support " \
           "training with differential privacy" in message
    # A plugin family that is not installed at the coordinator cannot be checked: named.
    r = register(client, eng, spec=readmission(
        model={"family": "plugin", "name": "residual_mlp",
               "params": {"n_features": 5, "n_classes": 2}}))
    assert r.status_code == 422, r.text
    assert "unknown model family 'residual_mlp'" in r.json()["message"]
    with Session(engine) as session:
        assert session.exec(select(Study)).all() == []


def test_a_run_of_a_plugin_study_pins_the_distribution_the_coordinator_has(
    client: TestClient, token_for: Callable[..., dict[str, str]],
    engine: Engine, on_path: Installed,
) -> None:
    from coordinator.study_registry import plan_task
    from fedward.run_config import RunPlan

    eng = token_for("ml_engineer")
    wrong = register(client, eng, spec=readmission(
        model={"family": "plugin", "name": "residual_mlp",
               "params": {"n_features": 5, "n_classes": 2}}))
    assert wrong.status_code == 422, wrong.text
    assert "cannot read the study's 6 encoded input columns" in wrong.json()["message"]
    spec = readmission(model={"family": "plugin", "name": "residual_mlp",
                              "params": {"n_features": 6, "n_classes": 2, "width": 8}})
    r = register(client, eng, spec=spec)
    assert r.status_code == 201, r.text
    assert (r.json()["model"], r.json()["plugin"]) == ("plugin", "residual_mlp")
    setup_registered_sites(client, eng, ["site-a"])
    client.post(api("/projects"), json={"name": "oncology"}, headers=eng)
    launched = client.post(api("/runs"), json={"project": "oncology", "rounds": 1,
                                               "epsilon": 3.0, "study": "readmission@1"},
                           headers=eng)
    assert launched.status_code == 201, launched.text
    config = launched.json()["config"]
    pin = model_plugin_pin("residual_mlp")
    assert {k: config[k] for k in pin.to_config()} == pin.to_config()
    plan = RunPlan(**config, run_id=launched.json()["id"], project="oncology",
                   task="readmission")
    wire = plan.task_config(1, train=True)
    assert PluginPin.from_config(wire, (CFG.MODEL_PLUGIN, CFG.MODEL_PLUGIN_VERSION,
                                        CFG.MODEL_PLUGIN_SHA256)) == pin
    assert plan_task(engine, plan).build(seed=0)(torch.zeros(2, 6)).shape == (2, 2)
    # The coordinator's plugin changed under the run: the ServerApp refuses to start it.
    other = plan.model_copy(update={"model_plugin_version": "0.0.9"})
    with pytest.raises(PluginError, match=r"pins the model plugin fedward-example-model==0\.0\.9"):
        plan_task(engine, other)
    with Session(engine) as session:
        (event,) = session.exec(select(AuditEvent).where(
            AuditEvent.action == "study.registered")).all()
        assert event.detail_json is not None and "residual_mlp" in event.detail_json


# --- the site: allow-list and admission ------------------------------------------------


def _admission(pin: PluginPin, run: str = "run-1") -> dict[str, Any]:
    return {"kind": "admission", "config": task_config(0, **{
        CFG.TRAIN: False, CFG.RUN_ID: run, CFG.MODEL_PLUGIN: pin.distribution,
        CFG.MODEL_PLUGIN_VERSION: pin.version, CFG.MODEL_PLUGIN_SHA256: pin.sha256})}


def test_the_policy_lists_plugins_exactly_and_every_problem_at_once() -> None:
    good = {"distribution": DIST, "version": "0.1.0", "sha256": "a" * 64}
    with pytest.raises(PolicyError) as caught:
        SitePolicy.from_dict(policy_doc(plugins=[
            good, {"distribution": "x y", "version": 1, "sha256": "abc", "url": "u"},
            {"distribution": "Fedward_Example.Model", "version": "0.1.0", "sha256": "b" * 64},
            "fedward-example-model"]))
    assert caught.value.problems == [
        "plugins[1]: unknown keys ['url'] (known: ['distribution', 'version', 'sha256'])",
        "plugins[1]: distribution 'x y' is not a distribution name",
        "plugins[1]: version 1 is not a version (a string, e.g. \"0.1.0\")",
        "plugins[1]: sha256 'abc' is not a SHA-256 (64 lowercase hex digits)",
        "plugins[2]: Fedward_Example.Model 0.1.0 is listed twice (also plugins[0])",
        "plugins[3] must be an object with distribution, version and sha256",
    ]
    policy = SitePolicy.from_dict(policy_doc(plugins=[good]))
    assert policy.plugins == (PluginPin(DIST, "0.1.0", "a" * 64),)
    assert SitePolicy.from_dict(policy.to_dict()) == policy


def test_admission_refuses_a_plugin_missing_at_another_version_build_or_not_allowed(
    make_trainer: Callable[..., tuple[WarmTrainer, AuditLog]],
    guard: DataGuard, example: Installed, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write_policy(tmp_path)
    trainer, audit = make_trainer()
    pin = wheel_sha256(example.wheel)

    def answer(p: PluginPin, run: str = "run-1") -> tuple[int, str]:
        return refusal(trainer.handle(_admission(p, run), {})[0])

    # Not installed in this site agent's environment.
    assert answer(pin) == (SiteErrorCode.REFUSED_POLICY, (
        "refused-policy: model plugin distribution fedward-example-model is missing at site "
        "hospital-a: the run needs fedward-example-model==0.1.0; the site's IT installs it "
        "(pip install 'fedward-example-model==0.1.0') and allows it in the policy's plugins"))
    monkeypatch.syspath_prepend(str(example.target))
    code, why = answer(PluginPin(DIST, "0.2.0", pin.sha256))
    assert why == ("refused-policy: model plugin distribution fedward-example-model is at "
                   "version 0.1.0 at site hospital-a, the run needs 0.2.0; the site's IT "
                   "installs 'fedward-example-model==0.2.0'")
    code, why = answer(PluginPin(DIST, "0.1.0", "f" * 64))
    assert why.startswith("refused-policy: model plugin fedward-example-model==0.1.0 "
                          f"installed at site hospital-a is another build (RECORD sha256 "
                          f"{pin.sha256}, the run pins {'f' * 64})")
    code, why = answer(pin)
    assert why == (f"refused-policy: model plugin {pin} is not allowed by the policy of site "
                   "hospital-a; its IT adds it to the policy's plugins (fedward-site policy "
                   "allow-plugin fedward-example-model)")
    assert guard.touched == 0
    # The site's IT allows exactly what is installed; the next answer accepts.
    result = CliRunner().invoke(site_cli, ["policy", "allow-plugin", DIST, "--dir",
                                           str(tmp_path), "--by", "dr-it"])
    assert result.exit_code == 0, result.output
    assert f"model plugin {pin} allowed by dr-it" in " ".join(result.output.split())
    assert SitePolicy.load(SitePaths(tmp_path).policy).plugins == (pin,)
    reply, _ = trainer.handle(_admission(pin), {})
    assert reply.get("status") == {"status": "accepted"}, reply
    # A malformed pin is a bad task, not a crash.
    bad = _admission(pin, "run-2")
    del bad["config"][CFG.MODEL_PLUGIN_SHA256]
    code, why = refusal(trainer.handle(bad, {})[0])
    assert (code, why.split(":")[0]) == (SiteErrorCode.BAD_TASK, "bad-task")
    entries, verdict = read_entries(audit.path)
    assert verdict.intact
    refused = [e.detail["reason"] for e in entries if e.action == "task-refused"]
    assert any("is missing at site hospital-a" in r for r in refused), refused
    allowed = [e.detail for e in entries if e.action == "plugin-allowed"]
    assert allowed == [{**pin.to_config(), "by": "dr-it"}]


# --- end to end ------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_plugin_study_is_refused_where_not_allowed_then_trains_at_two_sites(
        example: Installed, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real coordinator and two site agents, the plugin installed at each (PYTHONPATH):
    a site whose policy does not allow it refuses the run, named in the coordinator's
    admission view; once allowed, one DP-SGD round trains at both."""
    from federation import BIN, federation, run_cli
    from study_support import add_study_site, hospital_a, hospital_b
    from tests_support import short_tmp, wait_until

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(example.target)]))
    heart = (REPO / "tests" / "fixtures" / "heart_study.yaml").read_text().replace(
        "model:\n  family: logistic_regression",
        "model:\n  family: plugin\n  name: residual_mlp\n"
        "  params: {n_features: 16, n_classes: 2, width: 8, blocks: 1}")
    assert "residual_mlp" in heart
    with short_tmp() as work, federation(work, n_sites=2) as fed:
        wait_until(lambda: (fed.home / "superlink.address").exists(), timeout=180,
                   what="the coordinator's SuperLink address")
        study = work / "heart.yaml"
        study.write_text(heart)
        roots = {}
        for name, files in (("cardio-a", hospital_a(work)), ("cardio-b", hospital_b(work))):
            roots[name] = add_study_site(fed, name, *files, study=study)
        site_cli_bin = str(BIN / "fedward-site")
        # Hospital A allows the plugin it installed; hospital B has not yet.
        run_cli([site_cli_bin, "policy", "allow-plugin", DIST, "--dir", str(roots["cardio-a"])])
        for name in roots:
            fed.start_site(name)
        r = fed.api("POST", "/studies", {"text": heart, "source": "heart.yaml"})
        assert r.status_code == 201, r.text
        fed.wait_online(2)

        def launch() -> int:
            out = fed.coord_cli("launch", "--project", "test", "--study", "heart_disease@1",
                                "--epsilon", "3", "--rounds", "1", "--min-sites", "2",
                                "--round-deadline", "60", "--json")
            return int(json.loads(out.stdout)["id"])

        first = launch()
        done = fed.wait_run(first, timeout=240)
        assert done["status"] == "failed", done
        refused = {r["site"]: r["reason"] for r in done["admission"]["refused"]}
        assert list(refused) == ["cardio-b"], done["admission"]
        assert "model plugin fedward-example-model==0.1.0" in refused["cardio-b"]
        assert "is not allowed by the policy of site cardio-b" in refused["cardio-b"]
        assert "cardio-b" in str(done["failure_reason"])

        run_cli([site_cli_bin, "policy", "allow-plugin", DIST, "--dir", str(roots["cardio-b"])])
        second = launch()
        done = fed.wait_run(second, timeout=300)
        assert done["status"] == "completed", done
        pin = wheel_sha256(example.wheel)
        assert {k: done["config"][k] for k in pin.to_config()} == pin.to_config()
        rounds = fed.api("GET", f"/runs/{second}/rounds").json()
        assert [sorted(r["participating_sites"]) for r in rounds] == [["cardio-a", "cardio-b"]]
        for name in roots:
            seen = [e.detail for e in fed.site_audit(name) if e.action == "run-seen"]
            assert seen[-1]["model_plugin"] == pin.to_config(), seen
