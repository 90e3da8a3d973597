"""The kernel package ``fedward``: model registry, build metadata, process and file helpers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import fedward
from fedward.models import UnknownModelError, build, get_family, known_families
from fedward.tasks import TaskSpec

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedward", "coordinator", "site_agent", "privacy", "export")


# --- model registry --------------------------------------------------------------------------


def _plugin(root: Path, *, name: str, entry: str) -> None:
    """A distribution ``fake-models`` on ``root`` whose ``fedward.models`` entry point
    ``name`` names ``entry``; its module builds a plain linear model."""
    dist = root / "fake_models-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[fedward.models]\n{name} = {entry}\n")
    (root / "fake_models_mod.py").write_text(
        "from torch import nn\n\n"
        "def build(n_in: int = 3, n_out: int = 2) -> nn.Module:\n"
        "    return nn.Linear(n_in, n_out)\n\n"
        "NOT_A_FACTORY = 42\n")


def test_a_model_family_installed_as_a_plugin_is_found_and_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnknownModelError):
        get_family("tiny_linear")
    _plugin(tmp_path, name="tiny_linear", entry="fake_models_mod:build")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "tiny_linear" in known_families()
    model = build("tiny_linear", {"n_in": 5}, seed=3)
    assert tuple(model.state_dict()["weight"].shape) == (2, 5)
    again = build("tiny_linear", {"n_in": 5}, seed=3)
    assert model.state_dict()["weight"].equal(again.state_dict()["weight"])
    spec = TaskSpec(name="t", description="d", feature_columns=("a", "b", "c"),
                    label_column="y", n_classes=2, default_lr=0.1, default_batch_size=8,
                    model="tiny_linear")
    assert tuple(spec.build().state_dict()["weight"].shape) == (2, 3)


def test_an_unknown_model_family_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(UnknownModelError) as err:
        get_family("resnet9000")
    message = str(err.value)
    assert "unknown model family 'resnet9000'" in message
    assert "digits_cnn, tabular_mlp" in message
    assert "fedward.models" in message


def test_a_plugin_may_not_take_a_built_in_name_or_be_no_factory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _plugin(tmp_path / "a", name="tabular_mlp", entry="fake_models_mod:build")
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    with pytest.raises(UnknownModelError, match="takes the built-in family name"):
        known_families()
    monkeypatch.undo()
    _plugin(tmp_path / "b", name="broken", entry="fake_models_mod:NOT_A_FACTORY")
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    with pytest.raises(UnknownModelError, match="is not callable"):
        get_family("broken")


def test_reading_the_task_registry_loads_no_torch() -> None:
    code = ("import sys, fedward, fedward.tasks, fedward.wire, fedward.tokens, fedward.procs,"
            " fedward.files, fedward.certs, fedward.flower, fedward.flower.env,"
            " fedward.flower.exit_codes\n"
            "fedward.tasks.get_task('breast_cancer_mlp')\n"
            "print(sorted(m for m in ('torch', 'flwr') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- build metadata --------------------------------------------------------------------------


def test_the_code_revision_answers_from_build_metadata() -> None:
    revision = fedward.code_revision()
    assert revision == "unknown" or re.fullmatch(r"[0-9a-f]{40}(\+modified)?", revision)


@pytest.mark.parametrize(("fields", "expected"), [
    ({"version": "0.1.1.dev3+gabc1234.d20261206", "commit": "g" + "ab" * 20, "dirty": True},
     "ab" * 20 + "+modified"),
    ({"version": "0.1.1.dev3+gabc1234", "commit": "g" + "cd" * 20, "dirty": False},
     "cd" * 20),
    ({"version": "0.1.1.dev3+gabc12345.d20261206"}, "abc12345+modified"),
    ({"version": "0.1.0", "commit": None, "dirty": False}, "unknown"),
])
def test_the_code_revision_is_read_from_the_version_file(
        monkeypatch: pytest.MonkeyPatch, fields: dict[str, object], expected: str) -> None:
    monkeypatch.setitem(sys.modules, "fedward._version",
                        types.SimpleNamespace(**fields))  # type: ignore[arg-type]
    assert fedward.code_revision() == expected


def test_nothing_in_the_packages_runs_git() -> None:
    calls = re.compile(r"""(\[\s*["']git["']|["']git\s|shutil\.which\(\s*["']git|import git\b|"""
                       r"""from git\b)""")
    found = [f"{path.relative_to(REPO)}:{n}"
             for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), start=1)
             if calls.search(line)]
    assert found == []


# --- one atomic write ----------------------------------------------------------------------


def test_atomic_write_replaces_with_the_mode_and_leaves_no_temp_file(tmp_path: Path) -> None:
    from fedward.files import atomic_write

    target = tmp_path / "sub" / "state.json"
    atomic_write(target, "first", mode=0o644)
    assert target.read_text() == "first" and target.stat().st_mode & 0o777 == 0o644
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second" and target.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_a_failed_atomic_write_keeps_the_old_content(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from fedward import files

    target = tmp_path / "state.json"
    files.atomic_write(target, "old")

    def no_space(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        files.atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_files_are_replaced_only_through_the_one_atomic_write() -> None:
    """Every replace-a-file in the packages goes through fedward.files.atomic_write; the
    only other renames publish something already written through it (a signed bundle's
    staged folder, a renewal's staged key and certificate) or a database file built and
    fsynced beside it (the privacy ledger's SQLite file made from a JSON ledger, and the
    JSON ledger kept aside as its backup)."""
    allowed = {("fedward/files.py", "os.replace(tmp, path)"),
               ("privacy/ledger_db.py", "os.replace(self.legacy, backup)"),
               ("privacy/ledger_db.py", "os.replace(tmp, self.path)"),
               ("export/bundle.py", "os.rename(stage, final)"),
               ("site_agent/enroll.py", "os.replace(new_key, files.site_key)"),
               ("site_agent/enroll.py", "os.replace(new_cert, files.site_cert)"),
               # A drift report the coordinator refused is moved aside, not rewritten.
               ("site_agent/drift_runner.py", "path.rename(refused / path.name)")}
    found = set()
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for line in path.read_text().splitlines():
                code = line.split("#", 1)[0].strip()
                if re.search(r"\bos\.(replace|rename)\(|\.replace\(\s*\w*path\s*\)|"
                             r"\.rename\(", code):
                    found.add((str(path.relative_to(REPO)), code))
    assert found == allowed


# --- process trees (psutil) ----------------------------------------------------------------


def test_stop_process_tree_ends_a_detached_grandchild(tmp_path: Path) -> None:
    import psutil

    from fedward.procs import descendants, stop_process_tree

    # A child that starts a grandchild in a session of its own (as Flower's helpers are),
    # which ignores SIGTERM: only SIGKILL after the grace ends it.
    script = ("import subprocess, sys, time\n"
              "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'], "
              "start_new_session=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 20
        while not descendants(proc.pid):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        grandchild = psutil.Process(descendants(proc.pid)[0])
        t0 = time.monotonic()
        stop_process_tree(proc, timeout=1.0)  # type: ignore[arg-type]
        assert proc.poll() is not None
        grandchild.wait(timeout=5)
        assert not grandchild.is_running()
        assert time.monotonic() - t0 < 4.0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert descendants(proc.pid) == []


# --- one role table ------------------------------------------------------------------------


def test_the_role_table_gives_each_permission_its_roles() -> None:
    from fedward import roles
    from fedward.roles import Permission, roles_that

    staff = {"admin", "ml_engineer", "reviewer"}
    assert {p: set(roles_that(p)) for p in Permission} == {
        Permission.READ: staff | {"clinician"},
        Permission.WRITE: {"admin", "ml_engineer"},
        Permission.AUDIT: staff,
        Permission.USER_ADMIN: {"admin"},
        Permission.CERTIFICATES: {"admin"},
        Permission.STAFF: staff,
        Permission.PROPOSE: {"admin", "ml_engineer"},
        Permission.REVIEW: {"admin", "reviewer"},
        Permission.GATES: {"admin", "reviewer"},
        Permission.REVOKE: {"admin"},
    }
    assert roles.ALL_ROLES == roles.ROLES
    assert not roles.may("nobody", Permission.READ)


def test_roles_are_named_only_in_the_role_table() -> None:
    """No other module spells a role set or tests a role by its literal name."""
    spelled = re.compile(r"""frozenset\(\{\s*["'](admin|ml_engineer|reviewer|clinician)["']|"""
                         r"""role\s*[!=]=\s*["']|==\s*["'](admin|clinician)["']""")
    found = [f"{path.relative_to(REPO)}:{n}"
             for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
             if path != REPO / "fedward" / "roles.py"
             for n, line in enumerate(path.read_text().splitlines(), start=1)
             if spelled.search(line)]
    assert found == []


# --- one update digest ---------------------------------------------------------------------


def test_one_update_digest_on_both_sides_unchanged_for_recorded_runs() -> None:
    import numpy as np

    import coordinator.round_loop as round_loop
    import site_agent.training_round as trainer
    from fedward.wire import update_digest

    assert round_loop.update_digest is update_digest is trainer.update_digest
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
              "b": np.array([0.5, -1.0], np.float32)}
    # The value the coordinator recorded (audit ``round.updates``) before the digest moved
    # here: a resumed run's replay check still reads its earlier rounds right.
    assert update_digest(arrays) == (
        "1c8c320c9f04bfdd8dbb06c7cc1fba5f5a947b245d6e26f40a76bcda1f7491e3")
    assert update_digest({"w": arrays["w"].astype(np.float64)}) != update_digest(
        {"w": arrays["w"]})
