"""Fixtures shared by several test modules.

Helpers that are not fixtures live in support modules beside this file and are imported by
name: the federation harness (``federation.py``), ``wait_until`` and ``short_tmp``
(``tests_support.py``), the REST API's fakes (``api_support.py``), the release workflow's
model, runs and users (``release_support.py``), the round loop's in-process Grid
(``grid_support.py``), a site's policy (``site_policy_support.py``), studies
(``study_support.py``) and the browser (``browser_support.py``). No test module imports
from another. The fixtures import what they need when they run, so a module that uses none
of them does not pay for importing it.

A module may define a fixture of the same name as one here; its own then applies to its
tests (as ``test_releases`` does with ``make_client`` and ``client``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from sqlalchemy.engine import Engine

if TYPE_CHECKING:
    import numpy as np
    from guide_reading import Reading

    from site_agent.audit import AuditLog
    from site_agent.data import SiteData
    from site_agent.trainer import WarmTrainer

    from api_support import TestClient
    from grid_support import PlanFactory
    from site_policy_support import DataGuard


@pytest.fixture(scope="session", autouse=True)
def shared_noise_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One noise-multiplier cache for every site agent the tests start (``FEDWARD_CACHE_DIR``).

    A site searches its run's noise multiplier once per plan (a few tenths of a CPU-second)
    and keeps the answer; the tests start hundreds of fresh sites with the same few plans,
    so they share the answers, as the sites of one lab host may. Each answer read back is
    still confirmed by the ledger's accountant (``privacy.noise_cache``). Both xdist
    workers use the session's folder; pytest removes it with the session's other temporary
    folders.
    """
    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "noise-cache"
    shared.mkdir(exist_ok=True)
    before = os.environ.get("FEDWARD_CACHE_DIR")
    os.environ["FEDWARD_CACHE_DIR"] = str(shared)
    yield
    if before is None:
        os.environ.pop("FEDWARD_CACHE_DIR", None)
    else:
        os.environ["FEDWARD_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Train tiny models on one intra-op thread, as a site's trainer does.

    On a 2-core machine that is busy with anything else, torch's default of one thread per
    core makes the tiny per-sample ops of DP-SGD 10-20x slower (threads spin waiting for
    each other); one thread gives the same numbers. A module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty coordinator home folder."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def engine(home: Path) -> Iterator[Engine]:
    """The coordinator's database in ``home``, migrated to the head revision."""
    from coordinator.db import make_engine, run_migrations

    url = f"sqlite:///{home / 'coordinator.db'}"
    run_migrations(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


# --- the coordinator's REST API (helpers: api_support.py) ---------------------------------


@pytest.fixture
def token_for(engine: Engine) -> Callable[..., dict[str, str]]:
    """Factory: create a user with a role, return its Authorization header."""
    from coordinator.auth import create_user
    from coordinator.db import session_scope

    counter = iter(range(1000))

    def make(role: str = "ml_engineer") -> dict[str, str]:
        with session_scope(engine) as session:
            _, token = create_user(session, name=f"{role}-{next(counter)}", role=role)
        return {"Authorization": f"Bearer {token}"}

    return make


@pytest.fixture
def make_client(tmp_path: Path, engine: Engine) -> Iterator[Callable[..., TestClient]]:
    """Factory: a TestClient on an app with the given launcher and registrar."""
    from coordinator.api import create_app
    from coordinator.settings import Settings

    from api_support import TestClient

    clients: list[TestClient] = []

    def make(**kwargs: Any) -> TestClient:
        settings = Settings(home=tmp_path / "home")
        client = TestClient(create_app(settings=settings, engine=engine, **kwargs))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient], engine: Engine) -> TestClient:
    """A TestClient whose launcher and node registrar are the fakes of ``api_support``."""
    from api_support import FakeLauncher, FakeRegistrar

    return make_client(launcher=FakeLauncher(engine), registrar=FakeRegistrar())


# --- the round loop on an in-process Grid (helpers: grid_support.py) ----------------------


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages read the identity of the task that creates them (a ServerApp process).

    The round loop's modules ask for it for every test:
    ``pytestmark = pytest.mark.usefixtures("task_identity")``.
    """
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", 4242)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


@pytest.fixture
def grid_engine(tmp_path: Path) -> Iterator[Engine]:
    """A migrated database with the Grid's sites (``grid_support.NODES``) registered.

    The round loop's modules use it as their ``engine``.
    """
    from coordinator.db import make_engine, run_migrations, session_scope
    from coordinator.models import Site

    from grid_support import NODES

    url = f"sqlite:///{tmp_path / 'coordinator.db'}"
    run_migrations(url)
    eng = make_engine(url)
    with session_scope(eng) as session:
        for name, node in NODES.items():
            session.add(Site(name=name, flower_node_id=str(node), status="registered"))
    yield eng
    eng.dispose()


@pytest.fixture
def make_plan(grid_engine: Engine) -> PlanFactory:
    """Factory: insert a pending run and return its plan (overrides as keywords)."""
    from sqlmodel import select

    from coordinator.db import session_scope
    from coordinator.models import Project, Run
    from fedward.run_config import RunPlan

    from grid_support import NODES

    def make(**overrides: object) -> RunPlan:
        with session_scope(grid_engine) as session:
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
            # lr 1.0 is the task's default: the fake sites' changes stay within the DP bound.
            "round_deadline_s": 5.0, "lr": 1.0, "batch_size": 32, "max_grad_norm": 1.0,
            "seed": 0, "sites": tuple(NODES), "final_evaluate": False,
        }
        values.update(overrides)
        # Built without the API's bounds: these tests use deadlines of a fraction of a second.
        return RunPlan.model_construct(**values)  # type: ignore[arg-type]

    return make


# --- a site's policy and its warm trainer (helpers: site_policy_support.py) ---------------


@pytest.fixture(scope="module")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> SiteData:
    """One site's rows of the demo federation of the policy tests' task."""
    from site_agent.data import load_site_data
    from site_agent.data_schema import load_schema
    from site_agent.datasets import write_demo_federation

    from site_policy_support import TASK

    fed = write_demo_federation(task=TASK, out_dir=tmp_path_factory.mktemp("fed"), n_sites=2)
    site = fed.sites[0]
    return load_site_data(csv_path=site.csv_path, schema=load_schema(site.schema_path))


@pytest.fixture(scope="module")
def global_arrays() -> dict[str, np.ndarray]:
    """The arrays of the policy tests' task's model (seed 0)."""
    from fedward.models import model_arrays
    from fedward.tasks import build_model

    from site_policy_support import TASK

    return model_arrays(build_model(TASK, seed=0))


@pytest.fixture
def guard(monkeypatch: pytest.MonkeyPatch) -> DataGuard:
    """Evaluation and training raise while it is armed (see ``DataGuard``)."""
    from site_policy_support import DataGuard

    return DataGuard(monkeypatch)


@pytest.fixture
def make_trainer(site_data: SiteData, tmp_path: Path
                 ) -> Callable[..., tuple[WarmTrainer, AuditLog]]:
    """A trainer with a real gate and audit log on this test's site directory."""
    from privacy import PrivacyLedger
    from site_agent.admission import SiteGate
    from site_agent.approvals import ApprovalBook
    from site_agent.audit import AuditLog
    from site_agent.config import SitePaths
    from site_agent.trainer import WarmTrainer

    from site_policy_support import SITE, TASK

    def make(*, epsilon_cap: float | None = None) -> tuple[WarmTrainer, AuditLog]:
        paths = SitePaths(tmp_path)
        audit = AuditLog(paths.audit_log)
        gate = SiteGate(site_name=SITE, policy_path=paths.policy,
                        approvals=ApprovalBook(paths.approvals), audit=audit)
        trainer = WarmTrainer(site_name=SITE, task=TASK, data=site_data,
                              ledger=PrivacyLedger(paths.ledger), replies_dir=paths.replies,
                              audit=audit, epsilon_cap=epsilon_cap, gate=gate)
        return trainer, audit

    return make


@pytest.fixture
def reading(tmp_path: Path) -> Iterator[Reading]:
    """A reading of the guides (``guide_reading.Reading``) in this test's folder; every
    background process it started is stopped at the end (kept with FEDWARD_TEST_KEEP=1)."""
    from guide_reading import Reading, base_vars

    r = Reading(work=tmp_path, base_vars=base_vars())
    try:
        yield r
    finally:
        r.stop_all()
        if os.environ.get("FEDWARD_TEST_KEEP"):
            print(f"guide reading kept in {tmp_path}")
