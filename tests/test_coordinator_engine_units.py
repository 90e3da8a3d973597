"""Unit tests of the coordinator's engine: update checks, aggregation, the round loop on an
in-process Grid, checkpoints, the PKI and the Flower control helpers."""

from __future__ import annotations

import hashlib
import io
import ipaddress
import json
import math
import os
import stat
import tomllib
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from uuid import uuid4

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError
from sqlalchemy import Engine
from sqlmodel import col, select

from coordinator.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from coordinator.db import make_engine, run_migrations, session_scope
from coordinator.models import Project, Round, Run, Site, SiteMetric
from coordinator.pki import ensure_ca, issue_server_cert
from coordinator.repository import last_checkpoint, record_checkpoint
from coordinator.schemas import NodeKeyCreate
from export.wire import CFG, REPLY_ARRAYS, REPLY_METRICS, TASK_ARRAYS, TASK_CONFIG, SiteErrorCode
from site_agent.keys import ensure_node_key

with warnings.catch_warnings():
    # flwr imports typer, which touches aliases that Click 8.3+ deprecates: harmless here.
    warnings.filterwarnings("ignore", message=r"'click\.utils\.get_\w+_stream' is deprecated",
                            category=DeprecationWarning)
    from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.supercore.task_identity import TaskIdentity

    from coordinator.flower_control import (
        APP_COMPONENTS,
        NodeKeyError,
        app_bundle,
        node_public_key_bytes,
    )
    from coordinator.server_app import RoundLoop, RunPlan, aggregate, validate_update

EXPECTED = {"w": (2, 3), "b": (3,)}


def arrays_of(value: float) -> dict[str, np.ndarray]:
    return {name: np.full(shape, value, np.float32) for name, shape in EXPECTED.items()}


# --- validate_update ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda a: a["w"].__setitem__((0, 1), np.nan), "array 'w' contains NaN or Inf"),
        (lambda a: a["b"].__setitem__(2, -np.inf), "array 'b' contains NaN or Inf"),
        (lambda a: a.update(w=a["w"].astype(np.float64)),
         "array 'w' has dtype float64, expected float32"),
        (lambda a: a.update(b=np.zeros((1, 3), np.float32)),
         "array 'b' has shape [1, 3], expected [3]"),
        (lambda a: a.pop("b"), "update arrays ['w'] do not match the model's ['b', 'w']"),
        (lambda a: a.update(extra=np.zeros(1, np.float32)),
         "update arrays ['b', 'extra', 'w'] do not match the model's ['b', 'w']"),
    ],
)
def test_validate_update_rejects_with_the_specific_reason(
    change: Callable[[dict[str, np.ndarray]], object], problem: str
) -> None:
    update = arrays_of(0.5)
    change(update)
    assert validate_update(update, EXPECTED) == problem


def test_validate_update_accepts_a_sound_update() -> None:
    assert validate_update(arrays_of(0.5), EXPECTED) is None


# --- aggregate ---------------------------------------------------------------------------


def test_fedavg_is_the_weighted_mean() -> None:
    out = aggregate([(arrays_of(1.0), 100.0), (arrays_of(4.0), 300.0)], method="fedavg")
    assert set(out) == set(EXPECTED)
    for name, shape in EXPECTED.items():
        assert out[name].dtype == np.float32 and out[name].shape == shape
        np.testing.assert_allclose(out[name], 3.25)


def test_fedavg_with_no_positive_weight_is_the_plain_mean() -> None:
    out = aggregate([(arrays_of(1.0), 0.0), (arrays_of(3.0), -5.0)])
    np.testing.assert_allclose(out["w"], 2.0)


def test_fedavg_ignores_a_non_finite_weight_instead_of_spreading_nan() -> None:
    for bad in (math.nan, math.inf):
        out = aggregate([(arrays_of(1.0), bad), (arrays_of(3.0), 10.0), (arrays_of(5.0), 10.0)])
        np.testing.assert_allclose(out["w"], 4.0)
    huge = aggregate([(arrays_of(1.0), 1e308), (arrays_of(3.0), 1e308)])
    np.testing.assert_allclose(huge["w"], 2.0)


def test_robust_aggregations_resist_one_outlier_site_and_fedavg_does_not() -> None:
    honest = [(arrays_of(v), 100.0) for v in (1.0, 1.1, 0.9, 1.05)]
    updates = [*honest, (arrays_of(1e6), 100.0)]

    fedavg = aggregate(updates, method="fedavg")
    median = aggregate(updates, method="median")
    trimmed = aggregate(updates, method="trimmed-mean")

    assert float(fedavg["w"].max()) > 1e5
    np.testing.assert_allclose(median["w"], 1.05)
    np.testing.assert_allclose(trimmed["b"], (1.0 + 1.05 + 1.1) / 3, rtol=1e-6)


def test_unknown_aggregation_and_no_updates_raise() -> None:
    with pytest.raises(ValueError, match="unknown aggregation 'krum': use fedavg, median"):
        aggregate([(arrays_of(1.0), 1.0)], method="krum")
    with pytest.raises(ValueError, match="no updates to aggregate"):
        aggregate([])


# --- RoundLoop on an in-process Grid -----------------------------------------------------

SiteFn = Callable[[Message], Message | None]
NODES = {"hospital-a": 11, "hospital-b": 12, "hospital-c": 13}


class SiteGrid(Grid):
    """A Grid whose sites answer in-process: ``sites[node_id](msg)`` returns the reply (or
    None: the site never answers). Only nodes in ``online`` are reported connected."""

    def __init__(self, sites: dict[int, SiteFn], online: Iterable[int]) -> None:
        self.sites = sites
        self.online = list(online)
        self.sent: list[Message] = []
        self._replies: dict[str, Message] = {}

    def set_run(self, run: object) -> None:
        raise NotImplementedError

    @property
    def run(self) -> object:
        raise NotImplementedError

    def create_message(self, *args: object, **kwargs: object) -> Message:
        raise NotImplementedError

    def send_and_receive(self, *args: object, **kwargs: object) -> Iterable[Message]:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.online)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id  # what the SuperLink would set
            self.sent.append(msg)
            reply = self.sites[msg.metadata.dst_node_id](msg)
            if reply is not None:
                self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(m) for m in list(message_ids) if m in self._replies]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages read the identity of the task that creates them (a ServerApp process)."""
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 4242)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


def good_site(delta: float, n: float = 100.0) -> SiteFn:
    """A site that adds ``delta`` to every weight when training and reports metrics."""

    def answer(msg: Message) -> Message:
        if msg.metadata.message_type == MessageType.EVALUATE:
            return Message(RecordDict({REPLY_METRICS: MetricRecord(
                {"eval-accuracy": 0.75, "eval-loss": math.nan})}), reply_to=msg)
        incoming = {k: v.numpy() for k, v in msg.content[TASK_ARRAYS].items()}
        return Message(RecordDict({
            REPLY_ARRAYS: ArrayRecord({k: Array(v + np.float32(delta))
                                       for k, v in incoming.items()}),
            REPLY_METRICS: MetricRecord({"num-examples": n, "train-loss": 0.3}),
        }), reply_to=msg)

    return answer


def nan_site(msg: Message) -> Message:
    bad = {k: np.full(s, np.nan, np.float32) for k, s in EXPECTED.items()}
    return Message(RecordDict({
        REPLY_ARRAYS: ArrayRecord({k: Array(v) for k, v in bad.items()}),
        REPLY_METRICS: MetricRecord({"num-examples": 100.0}),
    }), reply_to=msg)


def refusing_site(msg: Message) -> Message:
    return Message(Error(code=SiteErrorCode.REFUSED_BUDGET,
                         reason="refused-budget: the round would spend 3.2 > 3.0"), reply_to=msg)


def silent_site(msg: Message) -> None:
    return None


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    run_migrations(url)
    eng = make_engine(url)
    with session_scope(eng) as session:
        for name, node in NODES.items():
            session.add(Site(name=name, flower_node_id=str(node), status="registered"))
    yield eng
    eng.dispose()


PlanFactory = Callable[..., RunPlan]


@pytest.fixture
def make_plan(engine: Engine) -> PlanFactory:
    """Factory: insert a pending run and return its plan (overrides as keywords)."""

    def make(**overrides: object) -> RunPlan:
        with session_scope(engine) as session:
            project = session.exec(select(Project)).first()
            if project is None:
                project = Project(name="oncology")
                session.add(project)
                session.flush()
            assert project.id is not None
            run = Run(project_id=project.id, task="breast_cancer_mlp", launched_by="alice",
                      config_json="{}")
            session.add(run)
            session.flush()
            assert run.id is not None
            run_id = run.id
        values: dict[str, object] = {
            "run_id": run_id, "project": "oncology", "task": "breast_cancer_mlp", "rounds": 1,
            "local_epochs": 1, "epsilon": 3.0, "delta": 1e-5, "min_sites": 1,
            "round_deadline_s": 5.0, "lr": 0.05, "batch_size": 32, "max_grad_norm": 1.0,
            "seed": 0, "sites": tuple(NODES), "final_evaluate": False,
        }
        values.update(overrides)
        return RunPlan(**values)  # type: ignore[arg-type]

    return make


def rounds_of(engine: Engine, run_id: int) -> list[Round]:
    with session_scope(engine) as session:
        rows = session.exec(select(Round).where(Round.run_id == run_id)
                            .order_by(Round.number)).all()
        session.expunge_all()
        return list(rows)


def run_row(engine: Engine, run_id: int) -> Run:
    with session_scope(engine) as session:
        run = session.get(Run, run_id)
        assert run is not None
        session.expunge(run)
        return run


def test_round_loop_aggregates_sound_updates_and_names_each_failed_site(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(rounds=2)
    grid = SiteGrid({11: good_site(1.0), 12: refusing_site, 13: nan_site}, online=[11, 12, 13])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    assert run_row(engine, plan.run_id).status == "completed"
    rounds = rounds_of(engine, plan.run_id)
    assert [(r.number, r.status) for r in rounds] == [(1, "completed"), (2, "completed")]
    assert json.loads(rounds[0].participating_sites_json) == ["hospital-a"]
    failed = {f["site"]: f for f in json.loads(rounds[0].failed_sites_json)}
    assert failed["hospital-b"] == {
        "site": "hospital-b", "phase": "train", "code": "refused-budget",
        "reason": "refused-budget: the round would spend 3.2 > 3.0"}
    assert failed["hospital-c"]["phase"] == "validate"
    assert failed["hospital-c"]["reason"] == "update rejected: array 'w' contains NaN or Inf"
    # Each round starts from the previous aggregate: only the sound site counted.
    last = last_checkpoint(engine, plan.run_id)
    assert last is not None and last[0] == 2
    final = load_checkpoint(tmp_path / last[1], expected_sha256=last[2])
    np.testing.assert_allclose(final["w"], 2.0)
    configs = [dict(m.content[TASK_CONFIG]) for m in grid.sent]
    assert [c[CFG.ROUND] for c in configs] == [1, 1, 1, 2, 2, 2]
    assert all(c[CFG.RUN_ID] == str(plan.run_id) and c[CFG.TRAIN] for c in configs)


def test_round_loop_fails_the_run_naming_late_and_offline_sites(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(min_sites=2, round_deadline_s=1.0)
    grid = SiteGrid({11: good_site(1.0), 12: silent_site, 13: good_site(1.0)}, online=[11, 12])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    run = run_row(engine, plan.run_id)
    assert run.status == "failed"
    assert run.failure_reason is not None
    assert run.failure_reason.startswith("round 1: 1 usable updates, the run needs at least 2")
    assert "hospital-b: late: no reply within the 1 s round deadline" in run.failure_reason
    assert "hospital-c: site offline" in run.failure_reason
    (round1,) = rounds_of(engine, plan.run_id)
    assert round1.status == "failed"
    assert json.loads(round1.late_sites_json) == ["hospital-b"]
    assert last_checkpoint(engine, plan.run_id) is None


def test_round_loop_fails_at_once_when_too_few_sites_are_online(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(min_sites=2, round_deadline_s=0.6)
    grid = SiteGrid({11: good_site(1.0)}, online=[11])

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan,
              initial=lambda: arrays_of(0.0)).run()

    run = run_row(engine, plan.run_id)
    assert run.status == "failed" and grid.sent == []
    assert run.failure_reason is not None
    assert "only 1 of 3 sites online" in run.failure_reason
    assert "offline: hospital-b, hospital-c" in run.failure_reason


def test_round_loop_resumes_from_the_last_checkpoint_and_evaluates_at_the_end(
    engine: Engine, make_plan: PlanFactory, tmp_path: Path
) -> None:
    plan = make_plan(rounds=2, sites=("hospital-a", "hospital-b"), final_evaluate=True)
    rel, sha = save_checkpoint(tmp_path, plan.run_id, 1, arrays_of(10.0))
    record_checkpoint(engine, plan.run_id, 1, str(rel), sha)
    grid = SiteGrid({11: good_site(1.0, n=100.0), 12: good_site(4.0, n=300.0)},
                    online=[11, 12])

    def no_initial() -> dict[str, np.ndarray]:
        raise AssertionError("a resumed run must not start from a fresh model")

    RoundLoop(grid=grid, engine=engine, home=tmp_path, plan=plan, initial=no_initial).run()

    assert run_row(engine, plan.run_id).status == "completed"
    assert [r.number for r in rounds_of(engine, plan.run_id)] == [2]
    train_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    eval_msgs = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    assert len(train_msgs) == 2 and len(eval_msgs) == 2
    assert all(m.content[TASK_CONFIG][CFG.ROUND] == 2 for m in train_msgs)
    np.testing.assert_array_equal(train_msgs[0].content[TASK_ARRAYS]["w"].numpy(),
                                  arrays_of(10.0)["w"])
    last = last_checkpoint(engine, plan.run_id)
    assert last is not None and last[0] == 2
    np.testing.assert_allclose(load_checkpoint(tmp_path / last[1])["b"], 10.0 + 3.25)
    assert all(not m.content[TASK_CONFIG][CFG.TRAIN] for m in eval_msgs)
    with session_scope(engine) as session:
        finals = {(m.site_name, m.name): m.value for m in session.exec(
            select(SiteMetric).where(SiteMetric.run_id == plan.run_id,
                                     col(SiteMetric.name).startswith("final-")))}
    assert finals == {("hospital-a", "final-eval-accuracy"): 0.75,
                      ("hospital-b", "final-eval-accuracy"): 0.75}


# --- checkpoints -------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    rel, sha = save_checkpoint(tmp_path, 7, 3, arrays)
    assert rel == Path("checkpoints/run-7/round-0003.safetensors")
    assert sha == hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()
    loaded = load_checkpoint(tmp_path / rel, expected_sha256=sha)
    assert loaded.keys() == arrays.keys()
    for name, value in arrays.items():
        np.testing.assert_array_equal(loaded[name], value)
        assert loaded[name].dtype == np.float32
    assert not list((tmp_path / rel).parent.glob("*.tmp"))


def test_checkpoint_with_one_changed_byte_is_refused(tmp_path: Path) -> None:
    rel, sha = save_checkpoint(tmp_path, 1, 1, {"w": np.zeros(16, np.float32)})
    path = tmp_path / rel
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a weight, not the header: the file still parses
    path.write_bytes(bytes(data))

    assert load_checkpoint(path)["w"][-1] != 0  # unverified, the change would go unseen
    with pytest.raises(CheckpointError, match="does not match its recorded SHA-256"):
        load_checkpoint(path, expected_sha256=sha)


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is missing"):
        load_checkpoint(tmp_path / "nope.safetensors", expected_sha256="0" * 64)


# --- pki ---------------------------------------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_ensure_ca_is_idempotent(tmp_path: Path) -> None:
    files = ensure_ca(tmp_path / "pki")
    before = (files.ca_cert.read_bytes(), files.ca_key.read_bytes())

    again = ensure_ca(tmp_path / "pki")

    assert again == files
    assert (again.ca_cert.read_bytes(), again.ca_key.read_bytes()) == before
    ca = x509.load_pem_x509_certificate(before[0])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_cert_verifies_against_the_ca_with_loopback_san(tmp_path: Path) -> None:
    files = ensure_ca(tmp_path / "pki")
    issue_server_cert(files)

    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert mode(files.ca_key) == 0o600 and mode(files.server_key) == 0o600


# --- flower_control ----------------------------------------------------------------------


def test_app_bundle_is_deterministic_and_points_at_installed_modules() -> None:
    with warnings.catch_warnings():
        # flwr's FAB builder asks pathspec for its "gitwildmatch" style, which pathspec 1.x
        # deprecates; the bundle it builds is unaffected.
        warnings.filterwarnings("ignore", message=r"GitWildMatchPattern \('gitwildmatch'\)",
                                category=DeprecationWarning)
        fab, digest = app_bundle()
        again, digest_again = app_bundle()

    assert fab == again and digest == digest_again == hashlib.sha256(fab).hexdigest()
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        pyproject = tomllib.loads(zf.read("pyproject.toml").decode())
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "coordinator.server_app:app",
                          "clientapp": "site_agent.clientapp:app"}
    assert components == APP_COMPONENTS
    assert pyproject["project"]["dependencies"] == []


def test_node_key_from_the_site_agent_is_accepted(tmp_path: Path) -> None:
    public = ensure_node_key(tmp_path / "keys" / "node_key", tmp_path / "keys" / "node_key.pub")

    pem = node_public_key_bytes(public + "\n")

    loaded = serialization.load_pem_public_key(pem)
    assert isinstance(loaded, ec.EllipticCurvePublicKey)
    assert loaded.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH).decode() == public
    assert mode(tmp_path / "keys" / "node_key") == 0o600


@pytest.mark.parametrize("garbage", ["not a key", "ssh-ecdsa AAAA", "ecdsa-sha2-nistp384 !!"])
def test_garbage_node_keys_are_refused_by_the_control_helper_and_the_api_schema(
    garbage: str,
) -> None:
    with pytest.raises(NodeKeyError, match="is not an OpenSSH public key"):
        node_public_key_bytes(garbage)
    with pytest.raises(ValidationError, match="not an OpenSSH public key"):
        NodeKeyCreate(public_key=garbage)


def test_rsa_node_keys_are_refused() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    rsa_text = rsa_key.public_bytes(serialization.Encoding.OpenSSH,
                                    serialization.PublicFormat.OpenSSH).decode()
    with pytest.raises(NodeKeyError, match="must be an ECDSA key"):
        node_public_key_bytes(rsa_text)
