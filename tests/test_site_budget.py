"""A site's privacy budget as a whole: whole-run admission, the site-wide cap, the audit
entry of every charge, the noise source, and the composed figures hospital IT reads.

Every task goes through ``WarmTrainer.handle`` with a real site gate, ledger and audit log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import site_agent.training_round as trainer_module
from fedward.models import model_arrays
from fedward.tasks import build_model
from fedward.wire import CFG, SiteErrorCode
from privacy import (
    Caps,
    DpSgd,
    LaplaceRelease,
    PrivacyLedger,
    compose_mechanisms,
    epsilon_for_history,
    expected_steps,
    noise_multiplier_for_run,
    sample_rate_for,
)
from site_agent.admission import SiteGate
from site_agent.approvals import ApprovalBook
from site_agent.audit import AuditLog, AuditLogError, read_entries
from site_agent.cli import app as site_cli
from site_agent.config import SitePaths
from site_agent.data import SiteData, load_site_data
from site_agent.data_schema import load_schema
from site_agent.datasets import write_demo_federation
from site_agent.noise_seed import round_noise_seed
from site_agent.trainer import WarmTrainer

from tests_support import no_warm_ups_left

TASK = "breast_cancer_mlp"
DELTA = 1e-5
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def site_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data CSV, schema) of one demo site."""
    fed = write_demo_federation(task=TASK, out_dir=tmp_path_factory.mktemp("fed"), n_sites=2)
    return fed.sites[0].csv_path, fed.sites[0].schema_path


@pytest.fixture(scope="module")
def site_data(site_files: tuple[Path, Path]) -> SiteData:
    return load_site_data(csv_path=site_files[0], schema=load_schema(site_files[1]))


@pytest.fixture(scope="module")
def global_arrays() -> dict[str, np.ndarray]:
    return model_arrays(build_model(TASK, seed=0))


def config(round_number: int = 1, **overrides: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        CFG.RUN_ID: "run-1", CFG.PROJECT: "oncology", CFG.TASK: TASK, CFG.ROUND: round_number,
        CFG.TOTAL_ROUNDS: 4, CFG.LOCAL_EPOCHS: 1, CFG.EPSILON: 3.0, CFG.DELTA: DELTA,
        CFG.CLIP: 1.0, CFG.LR: 0.05, CFG.BATCH: 32, CFG.SEED: 7, CFG.TRAIN: True,
    }
    out.update(overrides)
    return out


def train(round_number: int = 1, **overrides: Any) -> dict[str, Any]:
    return {"kind": "train", "config": config(round_number, **overrides)}


def admission(**overrides: Any) -> dict[str, Any]:
    return {"kind": "admission", "config": config(0, **{CFG.TRAIN: False, **overrides})}


def write_policy(root: Path, *, caps: dict[str, float] | None = None,
                 site_cap: float | None = None) -> None:
    caps = caps or {"oncology": 10.0}
    SitePaths(root).policy.write_text(json.dumps({
        "version": 1, "require_approval": False, "max_rounds_per_day": None,
        "site_epsilon_cap": site_cap,
        "projects": {name: {"epsilon_cap": cap, "tasks": [TASK]} for name, cap in caps.items()},
    }))


TrainerFactory = Callable[..., WarmTrainer]


@pytest.fixture
def make_trainer(site_data: SiteData, tmp_path: Path) -> TrainerFactory:
    """A trainer with a real gate, ledger and audit log on this test's site directory."""

    def make(*, audit: Callable[[str, dict[str, Any]], None] | None = None,
             noise_secret: bytes = b"") -> WarmTrainer:
        paths = SitePaths(tmp_path)
        log = AuditLog(paths.audit_log)
        gate = SiteGate(site_name="hospital-a", policy_path=paths.policy,
                        approvals=ApprovalBook(paths.approvals), audit=log)
        return WarmTrainer(site_name="hospital-a", task=TASK, data=site_data,
                           ledger=PrivacyLedger(paths.ledger), replies_dir=paths.replies,
                           audit=audit or log, gate=gate, noise_secret=noise_secret)

    return make


class Untouched:
    """Makes evaluation and training fail while armed: a refusal must not read the data."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.touched = 0
        monkeypatch.setattr(trainer_module, "evaluate", self._refuse)
        monkeypatch.setattr(trainer_module, "train_dp", self._refuse)

    def _refuse(self, **kwargs: Any) -> Any:
        self.touched += 1
        raise AssertionError("the site's data was read")


def refusal(reply: dict[str, Any]) -> tuple[int, str]:
    assert "error" in reply, reply
    return int(reply["error"]["code"]), str(reply["error"]["reason"])


def plan_figures(data: SiteData, *, epsilon: float = 3.0, rounds: int = 4
                 ) -> tuple[float, float, int]:
    """(sigma, q, steps per round) the trainer will use for ``config()``'s run."""
    n = len(data.train_y)
    q = sample_rate_for(n_examples=n, batch_size=32)
    steps = expected_steps(n_examples=n, batch_size=32, epochs=1)
    sigma = noise_multiplier_for_run(epsilon=epsilon, delta=DELTA, sample_rate=q,
                                     total_epochs=rounds)
    return sigma, q, steps


def dpsgd_epsilon(*history: tuple[float, float, int]) -> float:
    """The ledger accountant's figure of DP-SGD steps (sigma, q, steps)."""
    return compose_mechanisms([DpSgd(*h) for h in history], delta=DELTA).epsilon


def charged(root: Path) -> set[tuple[str, int]]:
    runs = PrivacyLedger(SitePaths(root).ledger).all_runs()
    return {(run_id, n) for run_id, run in runs.items() for n in run.rounds}


def audited_reservations(root: Path) -> set[tuple[str, int]]:
    entries, verdict = read_entries(SitePaths(root).audit_log)
    assert verdict.intact, verdict
    return {(str(e.detail["run"]), int(e.detail["round"])) for e in entries
            if e.action == "round-reserved"}


# --- Privacy 3: the whole run is checked at admission ------------------------------------


def test_a_run_that_cannot_finish_within_the_cap_is_refused_at_admission(
    make_trainer: TrainerFactory, site_data: SiteData, global_arrays: dict[str, np.ndarray],
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    sigma, q, steps = plan_figures(site_data)
    after_one = dpsgd_epsilon((sigma, q, steps))
    whole = dpsgd_epsilon((sigma, q, 4 * steps))
    # Round 1 alone fits the project's cap (the per-round check would train it and the
    # next); the run's four rounds do not.
    cap = (after_one + whole) / 2
    write_policy(tmp_path, caps={"oncology": cap})
    guard = Untouched(monkeypatch)
    trainer = make_trainer()

    code, reason = refusal(trainer.handle(admission(), {})[0])

    assert code == SiteErrorCode.REFUSED_BUDGET == 701
    assert reason.startswith(f"refused-budget: run run-1 needs epsilon {whole:.3f} at this "
                             "site for its 4 round(s) x 1 local epoch(s)")
    assert f"over the {cap:.3f} this site allows one run of project oncology" in reason
    assert "Nothing was read, trained or charged" in reason
    # The site's own record: the refusal with its figures, nothing charged.
    entries, _ = read_entries(SitePaths(tmp_path).audit_log)
    (refused,) = [e for e in entries if e.action == "task-refused"]
    assert refused.detail["kind"] == "admission" and refused.detail["code"] == 701
    assert refused.detail["reason"] == reason
    assert PrivacyLedger(SitePaths(tmp_path).ledger).get_run("run-1") is None
    # Asked to train round 1 anyway (a coordinator that ignores the answer): refused too,
    # before the data is read, although round 1 alone would fit.
    code, again = refusal(trainer.handle(train(1), global_arrays)[0])
    assert code == 701 and again == reason
    assert guard.touched == 0 and charged(tmp_path) == set()


def test_a_run_that_fits_is_admitted_and_leaves_round_one_no_accounting_to_do(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path,
) -> None:
    from privacy.accounting import _pld_epsilon
    from privacy.dp import _search_noise_ledger as _search_noise

    no_warm_ups_left()
    write_policy(tmp_path, caps={"oncology": 9.0}, site_cap=9.5)
    ledger = PrivacyLedger(SitePaths(tmp_path).ledger)
    ledger.open_run(run_id="earlier", project="oncology", epsilon_budget=1.0, delta=DELTA,
                    noise_multiplier=2.5, sample_rate=0.05)
    ledger.reserve_round(run_id="earlier", round_number=1, steps=20)
    trainer = make_trainer()
    # A budget no other test uses: nothing is cached before this admission. One round: no
    # warm-up for a round 2 runs while round 1's misses are counted.
    fresh = {CFG.EPSILON: 2.417, CFG.RUN_ID: "run-fits", CFG.TOTAL_ROUNDS: 1}

    reply, _ = trainer.handle(admission(**fresh), {})

    assert reply.get("status") == {"status": "accepted"}
    # No background work: the admission answer came after the run's accounting was done.
    searches, epsilons = _search_noise.cache_info().misses, _pld_epsilon.cache_info().misses
    reply, _ = trainer.handle(train(1, **fresh), global_arrays)
    assert "error" not in reply, reply
    assert _search_noise.cache_info().misses == searches     # round 1 ran no noise search
    assert _pld_epsilon.cache_info().misses == epsilons      # nor any new composition


# --- Privacy 7: a site-wide cap over every project ----------------------------------------


def test_the_site_wide_cap_bounds_every_project_at_admission_and_at_each_round(
    make_trainer: TrainerFactory, site_data: SiteData, global_arrays: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    caps = {"oncology": 10.0, "cardiology": 10.0}
    write_policy(tmp_path, caps=caps)
    trainer = make_trainer()
    small = {CFG.EPSILON: 1.0, CFG.TOTAL_ROUNDS: 2}
    reply, out = trainer.handle(train(1, **small), global_arrays)
    assert "error" not in reply
    ledger = PrivacyLedger(SitePaths(tmp_path).ledger)
    spent = ledger.site_epsilon()
    # Cardiology's run fits its own project's cap, but not on top of oncology's spend.
    sigma, q, steps = plan_figures(site_data, epsilon=3.0, rounds=4)
    whole = dpsgd_epsilon(*ledger.history("run-1"), (sigma, q, 4 * steps))
    site_cap = (spent + whole) / 2
    write_policy(tmp_path, caps=caps, site_cap=site_cap)
    cardio = {CFG.RUN_ID: "run-c", CFG.PROJECT: "cardiology"}
    code, reason = refusal(trainer.handle(admission(**cardio), {})[0])
    assert code == SiteErrorCode.REFUSED_BUDGET
    assert (f"the site-wide epsilon (all projects composed) would go from {spent:.3f} spent "
            f"to {whole:.3f}, over its cap of {site_cap:.3f} "
            f"({site_cap - spent:.3f} left)") in reason
    assert PrivacyLedger(SitePaths(tmp_path).ledger).get_run("run-c") is None
    # At each round too: IT lowers the site-wide cap below oncology's next round.
    write_policy(tmp_path, caps=caps, site_cap=spent * 1.0001)
    before = charged(tmp_path)
    code, reason = refusal(trainer.handle(train(2, **small), out)[0])
    assert code == SiteErrorCode.REFUSED_BUDGET
    assert "this round would bring the site's epsilon from" in reason
    assert "site-wide cap (site_epsilon_cap)" in reason
    assert charged(tmp_path) == before


# --- Privacy 6: no charge without its audit entry ----------------------------------------


def test_an_audit_log_that_cannot_record_the_reservation_charges_nothing(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path,
) -> None:
    write_policy(tmp_path)
    log = AuditLog(SitePaths(tmp_path).audit_log)

    def audit(action: str, detail: dict[str, Any]) -> None:
        if action == "round-reserved":
            raise AuditLogError("cannot write the audit log (disk full)")
        log(action, detail)

    trainer = make_trainer(audit=audit)
    code, reason = refusal(trainer.handle(train(1), global_arrays)[0])
    assert code == SiteErrorCode.REFUSED_POLICY and "cannot write its audit log" in reason
    assert charged(tmp_path) == set()       # nothing charged without its record
    assert charged(tmp_path) <= audited_reservations(tmp_path)


_KILLED_TRAINER = textwrap.dedent("""
    import json, os, signal, sys
    from pathlib import Path
    import numpy as np
    import privacy.ledger_db as ledger_db
    from fedward.models import model_arrays
    from fedward.tasks import build_model
    from fedward.wire import CFG
    from privacy import PrivacyLedger
    from site_agent.audit import AuditLog
    from site_agent.data import load_site_data
    from site_agent.data_schema import load_schema
    from site_agent.trainer import WarmTrainer

    root, csv, schema, where = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    log = AuditLog(root / "audit.log")
    real_writing = ledger_db._Store.writing

    def writing_then_die(self):
        # The reservation's transaction commits when the block ends; then die.
        with real_writing(self) as tx:
            yield tx
        if where == "after-ledger-write" and any(
                e.state == "reserved" for e in self.read().entries):
            os.kill(os.getpid(), signal.SIGKILL)   # the charge is on disk, nothing after it

    def audit(action, detail):
        log(action, detail)
        if where == "after-audit-entry" and action == "round-reserved":
            os.kill(os.getpid(), signal.SIGKILL)   # the entry is on disk, nothing after it

    import contextlib
    ledger_db._Store.writing = contextlib.contextmanager(writing_then_die)
    trainer = WarmTrainer(site_name="hospital-a", task="breast_cancer_mlp",
                          data=load_site_data(csv_path=Path(csv), schema=load_schema(Path(schema))),
                          ledger=PrivacyLedger(root / "privacy-ledger.sqlite"),
                          replies_dir=root / "replies", audit=audit)
    config = {CFG.RUN_ID: "run-k", CFG.PROJECT: "oncology", CFG.TASK: "breast_cancer_mlp",
              CFG.ROUND: 1, CFG.TOTAL_ROUNDS: 2, CFG.LOCAL_EPOCHS: 1, CFG.EPSILON: 3.0,
              CFG.DELTA: 1e-5, CFG.CLIP: 1.0, CFG.LR: 0.05, CFG.BATCH: 32, CFG.SEED: 1,
              CFG.TRAIN: True}
    trainer.handle({"kind": "train", "config": config}, model_arrays(build_model(
        "breast_cancer_mlp", seed=0)))
    print("not killed")
""")


@pytest.mark.parametrize("where", ["after-ledger-write", "after-audit-entry"])
def test_a_site_killed_between_charge_and_audit_entry_never_has_a_charge_without_entry(
    site_files: tuple[Path, Path], tmp_path: Path, where: str,
) -> None:
    csv, schema = site_files
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _KILLED_TRAINER, str(tmp_path), str(csv),
                           str(schema), where], capture_output=True, text=True, timeout=300,
                          env=env, cwd=REPO, check=False)
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-3000:])
    # The invariant an auditor checks: every charge in the ledger has its audit entry.
    assert charged(tmp_path) <= audited_reservations(tmp_path)
    assert audited_reservations(tmp_path) == {("run-k", 1)}
    if where == "after-ledger-write":
        assert charged(tmp_path) == {("run-k", 1)}
    else:
        assert charged(tmp_path) == set()   # recorded, then killed before the charge


# --- New-user 9: the noise source ---------------------------------------------------------


def test_a_rounds_noise_is_fresh_even_for_whoever_holds_the_sites_secret(
    site_data: SiteData, global_arrays: dict[str, np.ndarray], tmp_path: Path,
) -> None:
    secret = bytes(range(32))
    updates = []
    for copy in ("a", "b"):  # two copies of one site: same secret, data, run and round
        trainer = WarmTrainer(site_name="hospital-a", task=TASK, data=site_data,
                              ledger=PrivacyLedger(tmp_path / copy / "ledger.sqlite"),
                              replies_dir=tmp_path / copy / "replies", noise_secret=secret)
        reply, out = trainer.handle(train(1), global_arrays)
        assert "error" not in reply
        updates.append(out)
    assert any(not np.array_equal(updates[0][k], updates[1][k]) for k in updates[0])
    # Two rounds of one site draw different noise too.
    seeds = {round_noise_seed(secret=secret, run_id="r", round_number=n,
                              entropy=os.urandom(32)) for n in (1, 2)}
    assert len(seeds) == 2


def test_the_seed_mixes_the_secret_run_round_and_entropy() -> None:
    entropy = bytes(32)
    base = round_noise_seed(secret=b"s" * 32, run_id="r", round_number=1, entropy=entropy)
    assert base == round_noise_seed(secret=b"s" * 32, run_id="r", round_number=1,
                                    entropy=entropy)
    others = [round_noise_seed(secret=b"t" * 32, run_id="r", round_number=1, entropy=entropy),
              round_noise_seed(secret=b"s" * 32, run_id="q", round_number=1, entropy=entropy),
              round_noise_seed(secret=b"s" * 32, run_id="r", round_number=2, entropy=entropy),
              round_noise_seed(secret=b"s" * 32, run_id="r", round_number=1,
                               entropy=b"\x01" * 32)]
    assert base not in others and 0 <= base < 2**63
    with pytest.raises(ValueError, match="at least 16 bytes of entropy"):
        round_noise_seed(secret=b"", run_id="r", round_number=1, entropy=b"short")


def test_starting_the_trainer_shows_hospital_it_no_advice_it_cannot_follow() -> None:
    from site_agent.agent import _warm_up

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _warm_up(TASK)   # what the site agent runs at every start
        # An accounting whose optimal RDP order is at the edge of Opacus's range (it asks
        # to "expand the range of alphas" there); a noise multiplier no other test uses, so
        # that the answer is computed here, not taken from the cache.
        epsilon_for_history([(5.0123457, 0.1, 1)], delta=DELTA)
    texts = [str(w.message) for w in seen]
    assert not [t for t in texts if "Secure RNG" in t or "alpha" in t], texts


# --- New-user 7: the composed figures in `runs` and `status` -----------------------------


def test_runs_and_status_show_spent_composed_and_left_per_project_and_site(
    tmp_path: Path,
) -> None:
    write_policy(tmp_path, caps={"oncology": 4.0, "cardiology": 2.0}, site_cap=6.0)
    ledger = PrivacyLedger(SitePaths(tmp_path).ledger)
    book = ApprovalBook(SitePaths(tmp_path).approvals)
    for run_id, eps in (("1", 3.0), ("2", 2.0)):
        sigma = noise_multiplier_for_run(epsilon=eps, delta=DELTA, sample_rate=1 / 7,
                                         total_epochs=9)
        ledger.open_run(run_id=run_id, project="oncology", epsilon_budget=eps, delta=DELTA,
                        noise_multiplier=sigma, sample_rate=1 / 7)
        for number in (1, 2, 3):
            ledger.reserve_round(run_id=run_id, round_number=number, steps=21)
            ledger.complete_round(run_id=run_id, round_number=number)
        book.observe(run_id=run_id, project="oncology", task=TASK, total_rounds=3,
                     refusal=lambda record: None)
    per_run = [ledger.epsilon_spent("1"), ledger.epsilon_spent("2")]
    composed = ledger.project_epsilon("oncology")
    assert composed < sum(per_run) and sum(per_run) > 4.0 > composed  # no breach

    runner = CliRunner()
    rows = json.loads(runner.invoke(site_cli, ["runs", "--dir", str(tmp_path), "--json"]).output)
    assert [r["epsilon_spent"] for r in rows] == per_run
    assert rows[0]["project_budget"] == {"scope": "project", "name": "oncology",
                                         "spent": composed, "cap": 4.0, "left": 4.0 - composed,
                                         "accountant": "pld"}
    assert rows[0]["site_budget"]["spent"] == composed and rows[0]["site_budget"]["cap"] == 6.0
    status = json.loads(runner.invoke(site_cli, ["status", "--dir", str(tmp_path),
                                                 "--json"]).output)
    assert status["policy"] == "ok" and status["runs"] == {"done": 2}
    assert {p["name"]: (p["spent"], p["left"]) for p in status["projects"]} == {
        "cardiology": (0.0, 2.0), "oncology": (composed, 4.0 - composed)}
    assert status["site_budget"]["left"] == 6.0 - composed
    for command in ("runs", "status"):
        text = runner.invoke(site_cli, [command, "--dir", str(tmp_path)],
                             terminal_width=120).output
        assert f"{composed:.3f}" in text and f"{4.0 - composed:.3f}" in text
        assert "site-wide (all projects)" in text and f"{6.0 - composed:.3f}" in text
        assert "do not add up" in text


# --- one accountant over every disclosure -------------------------------------------------


def test_statistics_released_earlier_count_against_a_runs_admission(
    make_trainer: TrainerFactory, site_data: SiteData, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sigma, q, steps = plan_figures(site_data)
    whole = dpsgd_epsilon((sigma, q, 4 * steps))
    write_policy(tmp_path, caps={"oncology": whole * 1.05})
    # Alone, the run's training fits the project's cap.
    assert trainer_accepts(make_trainer(), admission())
    # Another run of the project released statistics about the same rows: composed with
    # them, the training no longer fits. Refused at admission, with the figures.
    ledger = PrivacyLedger(SitePaths(tmp_path).ledger)
    ledger.open_run(run_id="study-stats", project="oncology", epsilon_budget=5.0, delta=DELTA)
    stats = LaplaceRelease(scale=2.0, l1_sensitivity=1.0, count=1)
    ledger.reserve(run_id="study-stats", purpose="statistics", key="table-1", mechanism=stats,
                   caps=Caps(project=whole * 1.05))
    spent = ledger.project_epsilon("oncology")
    after = compose_mechanisms([stats, DpSgd(sigma, q, 4 * steps)], delta=DELTA).epsilon
    guard = Untouched(monkeypatch)
    code, reason = refusal(make_trainer().handle(admission(**{CFG.RUN_ID: "run-2"}), {})[0])
    assert code == SiteErrorCode.REFUSED_BUDGET
    assert (f"project oncology's epsilon at this site would go from {spent:.3f} spent to "
            f"{after:.3f}") in reason
    assert guard.touched == 0


def trainer_accepts(trainer: WarmTrainer, task: dict[str, Any]) -> bool:
    reply, _ = trainer.handle(task, {})
    return reply.get("status") == {"status": "accepted"}


def test_a_ledger_entry_of_an_unknown_mechanism_stops_training_naming_it(
    make_trainer: TrainerFactory, global_arrays: dict[str, np.ndarray], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sqlite3

    write_policy(tmp_path)
    trainer = make_trainer()
    reply, out = trainer.handle(train(1), global_arrays)
    assert "error" not in reply
    # A newer Fedward recorded a mechanism this version does not know.
    con = sqlite3.connect(SitePaths(tmp_path).ledger)
    try:
        con.execute("INSERT INTO entries (run_id, project, purpose, key, round, delta, "
                    "mechanism, state, epsilon_after, reserved_at) VALUES ('run-1', 'oncology',"
                    " 'statistics', 'new-kind', NULL, 1e-5, '{\"type\": \"SkellamRound\"}', "
                    "'charged', 2.0, '2027-01-01T00:00:00+00:00')")
        con.commit()
    finally:
        con.close()
    guard = Untouched(monkeypatch)
    for task, arrays in ((train(2), out), (admission(**{CFG.RUN_ID: "run-9"}), {})):
        code, reason = refusal(trainer.handle(task, arrays)[0])
        assert code == SiteErrorCode.REFUSED_POLICY
        assert ("refused-policy: the site refuses to train: its privacy ledger holds an entry "
                "this version cannot account (entry 2 records mechanism type "
                "'SkellamRound')") in reason
        assert "fedward-site ledger show" in reason
    assert guard.touched == 0
    entries, _ = read_entries(SitePaths(tmp_path).audit_log)
    assert [e.detail["code"] for e in entries if e.action == "task-refused"] == [703, 703]
    # Hospital IT sees the entry as stored.
    result = CliRunner().invoke(site_cli, ["ledger", "show", "--dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "SkellamRound" in result.output and "entry 2 (run 'run-1', statistics)" in (
        result.output.replace("\n", ""))


def test_ledger_show_and_runs_detail_list_every_disclosure_with_its_mechanism(
    tmp_path: Path,
) -> None:
    write_policy(tmp_path, caps={"oncology": 9.0})
    ledger = PrivacyLedger(SitePaths(tmp_path).ledger)
    ledger.open_run(run_id="7", project="oncology", epsilon_budget=6.0, delta=DELTA,
                    noise_multiplier=1.7, sample_rate=0.125)
    ledger.reserve(run_id="7", purpose="statistics", key="table-1",
                   mechanism=LaplaceRelease(scale=10.0, l1_sensitivity=1.0, count=2))
    for n in (1, 2):
        ledger.reserve_round(run_id="7", round_number=n, steps=8)
    ledger.complete_round(run_id="7", round_number=1)
    ApprovalBook(SitePaths(tmp_path).approvals).observe(
        run_id="7", project="oncology", task=TASK, total_rounds=3, refusal=lambda record: None)
    runner = CliRunner()

    shown = json.loads(runner.invoke(site_cli, ["ledger", "show", "--dir", str(tmp_path),
                                                "--json"]).output)
    assert [(e["purpose"], e["key"], e["state"], e["mechanism"]["type"])
            for e in shown["entries"]] == [("statistics", "table-1", "reserved", "LaplaceRelease"),
                                           ("round", "1", "charged", "DpSgd"),
                                           ("round", "2", "reserved", "DpSgd")]
    run_figure = shown["figures"]["runs"]["7"]
    assert run_figure["accountant"] == "pld"
    assert run_figure["epsilon"] == ledger.epsilon_spent("7")
    assert run_figure["epsilon"] < run_figure["rdp"]           # the looser cross-check
    assert shown["figures"]["site"]["epsilon"] == ledger.site_epsilon()

    text = runner.invoke(site_cli, ["ledger", "show", "--dir", str(tmp_path)],
                         terminal_width=200).output
    assert "Laplace release x2: scale 10, L1 sensitivity 1" in text
    assert "DP-SGD: 8 step(s), noise multiplier 1.7, sample rate 0.125" in text
    assert f"{ledger.epsilon_spent('7'):.3f}" in text and "PLD" in text

    rows = json.loads(runner.invoke(site_cli, ["runs", "--dir", str(tmp_path), "--json",
                                               "--detail"]).output)
    assert [d["purpose"] for d in rows[0]["disclosures"]] == ["statistics", "round", "round"]
    assert rows[0]["epsilon_spent"] == ledger.epsilon_spent("7")
    assert rows[0]["rounds_trained"] == 1
    text = runner.invoke(site_cli, ["runs", "--dir", str(tmp_path), "--detail"],
                         terminal_width=200).output
    assert "run 7: disclosures" in text and "Laplace release x2" in text


def test_a_run_waiting_for_approval_is_answered_pending_over_an_unreadable_ledger(
    make_trainer: TrainerFactory, tmp_path: Path,
) -> None:
    paths = SitePaths(tmp_path)
    paths.policy.write_text(json.dumps({
        "version": 1, "require_approval": True, "max_rounds_per_day": None,
        "site_epsilon_cap": None,
        "projects": {"oncology": {"epsilon_cap": 10.0, "tasks": [TASK]}}}))
    paths.ledger.write_bytes(b"not a database " * 100)
    reply, _ = make_trainer().handle(admission(), {})
    code, reason = refusal(reply)          # answered, not a dropped connection
    assert code == SiteErrorCode.PENDING_APPROVAL
    ApprovalBook(paths.approvals).decide("run-1", "approved", by="it")
    code, reason = refusal(make_trainer().handle(admission(), {})[0])
    assert code == SiteErrorCode.REFUSED_POLICY
    assert "its privacy ledger cannot be read" in reason


def test_a_secure_run_is_admitted_against_its_distributed_plan(
    make_trainer: TrainerFactory, tmp_path: Path,
) -> None:
    from privacy.distributed import DistributedPlan, mechanism, noise_multiplier_for

    dim = sum(v.size for v in model_arrays(build_model(TASK, seed=0)).values())
    z = noise_multiplier_for(epsilon=3.0, delta=DELTA, rounds=4, dim=dim, threshold=2)
    whole = compose_mechanisms([mechanism(DistributedPlan(1.0, dim, 2, z), 4)],
                               delta=DELTA).epsilon
    secure = {CFG.SECURE: True, CFG.SECAGG_THRESHOLD: 2}
    write_policy(tmp_path, caps={"oncology": 0.9 * whole})
    trainer = make_trainer()
    code, reason = refusal(trainer.handle(admission(**secure), {})[0])
    assert code == 701 and "4 secure-aggregation round(s) at threshold 2" in reason, reason
    assert f"{whole:.3f}" in reason
    write_policy(tmp_path, caps={"oncology": 1.1 * whole})
    assert "error" not in trainer.handle(admission(**secure), {})[0]
    # Nothing was opened or charged by answering: the run trains no DP-SGD.
    assert PrivacyLedger(SitePaths(tmp_path).ledger).get_run("run-1") is None
