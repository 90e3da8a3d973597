"""The site's audit log: the hash chain, tamper detection, torn writes, concurrency, CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from typer.testing import CliRunner

from fedward.models import model_arrays
from fedward.tasks import build_model
from fedward.wire import CFG, SiteErrorCode
from privacy import PrivacyLedger
from site_agent.audit import (
    GENESIS_HASH,
    AuditLog,
    AuditLogError,
    entry_hash,
    inspect_log,
    read_entries,
    verify_log,
)
from site_agent.cli import app as site_cli
from site_agent.data import load_site_data
from site_agent.data_schema import load_schema
from site_agent.datasets import write_demo_federation
from site_agent.keys import FINGERPRINT_KEY_FILE, ensure_fingerprint_key
from site_agent.trainer import WarmTrainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def make_log(tmp_path: Path) -> Callable[[int], AuditLog]:
    """A log with ``n`` entries about runs r-1 and r-2."""

    def make(n: int) -> AuditLog:
        log = AuditLog(tmp_path / "audit.log")
        for i in range(1, n + 1):
            log.append("round-trained", {"run": f"r-{1 + i % 2}", "round": i,
                                         "bytes_out": 100 * i, "metrics": ["train-loss"]})
        return log

    return make


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_chain_verifies_and_links_every_entry(make_log: Callable[[int], AuditLog]) -> None:
    log = make_log(5)
    entries, verdict = read_entries(log.path)
    assert verdict.intact and verdict.n_entries == 5 and verify_log(log.path) is None
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5]
    assert entries[0].prev_hash == GENESIS_HASH
    for before, after in itertools.pairwise(entries):
        assert after.prev_hash == before.hash
    for e in entries:
        assert e.hash == entry_hash(seq=e.seq, at=e.at, action=e.action, detail=e.detail,
                                    prev_hash=e.prev_hash)
        assert e.at.endswith("+00:00")
    assert verdict.head_hash == entries[-1].hash
    assert log.path.stat().st_mode & 0o777 == 0o600


def test_missing_log_is_an_empty_intact_log(tmp_path: Path) -> None:
    verdict = inspect_log(tmp_path / "audit.log")
    assert verdict.intact and verdict.n_entries == 0 and verdict.head_hash == GENESIS_HASH


def edit_detail(path: Path, index: int, **changes: Any) -> dict[str, Any]:
    lines = lines_of(path)
    obj = json.loads(lines[index])
    obj["detail"].update(changes)
    lines[index] = (json.dumps(obj, sort_keys=True) + "\n").encode()
    path.write_bytes(b"".join(lines))
    return dict(obj)


def test_an_edited_detail_is_named(make_log: Callable[[int], AuditLog]) -> None:
    log = make_log(6)
    edit_detail(log.path, 3, bytes_out=1)
    verdict = inspect_log(log.path)
    assert verdict.broken_seq == 4 == verify_log(log.path)
    assert verdict.why == "its content does not match its hash (the entry was edited)"
    assert verdict.n_entries == 3


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(
    make_log: Callable[[int], AuditLog],
) -> None:
    log = make_log(6)
    lines = lines_of(log.path)
    obj = json.loads(lines[2])
    obj["detail"]["bytes_out"] = 1
    obj["hash"] = entry_hash(seq=obj["seq"], at=obj["at"], action=obj["action"],
                             detail=obj["detail"], prev_hash=obj["prev_hash"])
    lines[2] = (json.dumps(obj) + "\n").encode()
    log.path.write_bytes(b"".join(lines))
    verdict = inspect_log(log.path)
    assert verdict.broken_seq == 4
    assert verdict.why is not None and "does not chain to entry 3" in verdict.why


def _old_release_log(path: Path, n: int) -> None:
    """A log as agents before format version 2 wrote it: each line the JSON (sorted keys,
    no spaces, ASCII) of the entry, its hash SHA-256 of that JSON without the hash."""
    prev = GENESIS_HASH
    with path.open("wb") as fh:
        for seq in range(1, n + 1):
            entry: dict[str, Any] = {"seq": seq, "at": f"2026-01-02T03:04:0{seq}+00:00",
                                     "action": "run-seen",
                                     "detail": {"run": "7", "note": "Zoë", "eps": 0.5},
                                     "prev_hash": prev}
            entry["hash"] = hashlib.sha256(json.dumps(
                entry, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            fh.write(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n")
            prev = entry["hash"]


def test_an_old_log_goes_on_in_the_new_format_and_still_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _old_release_log(path, 3)
    log = AuditLog(path)
    log.append("round-trained", {"run": "7", "round": 1, "flwr_run": 2**63 - 5})
    log.append("round-trained", {"run": "7", "round": 2, "eps": 1.0})
    entries, verdict = read_entries(path)
    assert verdict.intact and verdict.n_entries == 5
    assert [e.version for e in entries] == [1, 1, 1, 2, 2]
    assert entries[3].prev_hash == entries[2].hash
    # A new line is RFC 8785 canonical JSON, and its hash covers the entry with "v": 2; an
    # integer beyond 2**53 is kept exactly, as a string (I-JSON).
    line = lines_of(path)[3]
    obj = json.loads(line)
    assert line == rfc8785.dumps(obj) + b"\n"
    assert obj["detail"]["flwr_run"] == str(2**63 - 5) and obj["v"] == 2
    body = {k: obj[k] for k in ("seq", "at", "action", "detail", "v")}
    assert obj["hash"] == hashlib.sha256(obj["prev_hash"].encode()
                                         + rfc8785.dumps(body)).hexdigest()


def test_a_tampered_old_entry_or_an_old_entry_after_new_ones_is_named(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    _old_release_log(path, 3)
    AuditLog(path).append("round-trained", {"run": "7", "round": 1})
    edit_detail(path, 1, note="Zoe")
    verdict = inspect_log(path)
    assert verdict.broken_seq == 2
    assert verdict.why == "its content does not match its hash (the entry was edited)"

    _old_release_log(path, 2)
    log = AuditLog(path)
    log.append("round-trained", {"run": "7", "round": 1})
    entries, _ = read_entries(path)
    # A well-formed old-format entry chained after the new one: refused all the same.
    old: dict[str, Any] = {"seq": 4, "at": "2026-01-02T03:05:00+00:00", "action": "run-seen",
                           "detail": {}, "prev_hash": entries[-1].hash}
    old["hash"] = hashlib.sha256(json.dumps(old, sort_keys=True,
                                            separators=(",", ":")).encode()).hexdigest()
    with path.open("ab") as fh:
        fh.write(json.dumps(old, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    verdict = inspect_log(path)
    assert verdict.broken_seq == 4 and verdict.n_entries == 3
    assert verdict.why is not None and "old format after entries in the new one" in verdict.why


def test_a_deleted_line_is_named(make_log: Callable[[int], AuditLog]) -> None:
    log = make_log(6)
    lines = lines_of(log.path)
    del lines[2]
    log.path.write_bytes(b"".join(lines))
    verdict = inspect_log(log.path)
    assert verdict.broken_seq == 3
    assert verdict.why == ("sequence number is 4, expected 3 (an entry was deleted, inserted "
                           "or moved)")


def test_reordered_lines_are_named(make_log: Callable[[int], AuditLog]) -> None:
    log = make_log(6)
    lines = lines_of(log.path)
    lines[3], lines[4] = lines[4], lines[3]
    log.path.write_bytes(b"".join(lines))
    assert verify_log(log.path) == 4


def test_a_line_that_is_not_json_is_named(make_log: Callable[[int], AuditLog]) -> None:
    log = make_log(3)
    lines = lines_of(log.path)
    lines[1] = b"garbage\n"
    log.path.write_bytes(b"".join(lines))
    verdict = inspect_log(log.path)
    assert verdict.broken_seq == 2 and verdict.why == "not a valid JSON line"


def test_a_torn_last_line_is_named_and_the_next_append_repairs_it(
    make_log: Callable[[int], AuditLog],
) -> None:
    log = make_log(4)
    full = log.path.read_bytes()
    log.append("round-trained", {"run": "r-1", "round": 5})
    torn = log.path.read_bytes()[len(full):][:37]  # the crash cut the 5th entry short
    log.path.write_bytes(full + torn)

    verdict = inspect_log(log.path)
    assert verdict.broken_seq == 5 and verdict.n_entries == 4
    assert verdict.why is not None and verdict.why.startswith(
        "incomplete last line of 37 bytes")

    log.append("run-seen", {"run": "r-3"})
    entries, verdict = read_entries(log.path)
    assert verdict.intact and [e.action for e in entries][-2:] == ["audit-log-repaired",
                                                                   "run-seen"]
    repair = entries[-2]
    assert repair.seq == 5 and repair.detail["torn_bytes"] == 37
    assert repair.detail["moved_to"] == "audit.log.torn"
    assert (log.path.parent / "audit.log.torn").read_bytes() == torn + b"\n"


def test_a_torn_first_line_is_entry_one(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b'{"seq": 1, "at"')
    assert verify_log(path) == 1
    entry = AuditLog(path).append("agent-started", {})
    assert entry.seq == 2 and entry.prev_hash != GENESIS_HASH
    assert verify_log(path) is None
    assert [e.seq for e in read_entries(path)[0]] == [1, 2]


def test_append_after_a_damaged_last_entry_refuses(make_log: Callable[[int], AuditLog]) -> None:
    log = make_log(2)
    log.path.write_bytes(log.path.read_bytes() + b"not an entry\n")
    with pytest.raises(AuditLogError, match="restore the file from backup"):
        log.append("run-seen", {"run": "r-1"})


def test_details_must_be_plain_json(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    with pytest.raises(ValueError):
        log.append("x", {"value": float("nan")})
    with pytest.raises(TypeError):
        log.append("x", {"value": object()})
    assert not (tmp_path / "audit.log").exists() or verify_log(tmp_path / "audit.log") is None


def test_concurrent_appends_from_two_threads_stay_linear(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    logs = [AuditLog(path), AuditLog(path)]  # two instances: the file lock must serialise
    barrier = threading.Barrier(2)

    def worker(k: int) -> None:
        barrier.wait()
        for i in range(60):
            logs[k].append("evaluated", {"run": f"t-{k}", "round": i})

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    entries, verdict = read_entries(path)
    assert verdict.intact and verdict.n_entries == 120
    assert [e.seq for e in entries] == list(range(1, 121))
    for k in range(2):
        assert [e.detail["round"] for e in entries if e.detail["run"] == f"t-{k}"] == \
            list(range(60))


def test_concurrent_appends_from_two_processes_stay_linear(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    code = ("import sys; from pathlib import Path; from site_agent.audit import AuditLog\n"
            "log = AuditLog(Path(sys.argv[1]))\n"
            "for i in range(40): log.append('evaluated', {'run': sys.argv[2], 'round': i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"p-{k}"], cwd=REPO)
             for k in range(2)]
    for p in procs:
        assert p.wait(timeout=60) == 0
    entries, verdict = read_entries(path)
    assert verdict.intact and verdict.n_entries == 80
    assert [e.seq for e in entries] == list(range(1, 81))


# --- the trainer writes what left the site, never values ----------------------------------


def test_a_trained_round_is_audited_without_data_values(tmp_path: Path) -> None:
    fed = write_demo_federation(task="breast_cancer_mlp", out_dir=tmp_path / "fed", n_sites=2)
    site = fed.sites[0]
    key = ensure_fingerprint_key(tmp_path / "keys" / FINGERPRINT_KEY_FILE)
    data = load_site_data(csv_path=site.csv_path, schema=load_schema(site.schema_path),
                          fingerprint_key=key)
    log = AuditLog(tmp_path / "audit.log")
    trainer = WarmTrainer(site_name="hospital-a", task="breast_cancer_mlp", data=data,
                          ledger=PrivacyLedger(tmp_path / "ledger.sqlite"),
                          replies_dir=tmp_path / "replies", audit=log)
    config = {CFG.RUN_ID: "7", CFG.PROJECT: "oncology", CFG.TASK: "breast_cancer_mlp",
              CFG.ROUND: 1, CFG.TOTAL_ROUNDS: 2, CFG.LOCAL_EPOCHS: 1, CFG.EPSILON: 3.0,
              CFG.DELTA: 1e-5, CFG.CLIP: 1.0, CFG.LR: 0.05, CFG.BATCH: 32, CFG.SEED: 1}
    arrays = model_arrays(build_model("breast_cancer_mlp", seed=0))
    reply, out = trainer.handle({"kind": "train", "config": config}, arrays)
    assert "error" not in reply

    entries, verdict = read_entries(log.path)
    assert verdict.intact
    trained = entries[-1]
    assert trained.action == "round-trained"
    assert trained.detail["run"] == "7" and trained.detail["round"] == 1
    assert trained.detail["epsilon_spent"] == pytest.approx(reply["metrics"]["epsilon-spent"])
    assert trained.detail["array_shapes"] == {k: list(v.shape) for k, v in out.items()}
    # What left: the arrays, 8 bytes a metric, and the fingerprint's text (hashes, counts).
    assert trained.detail["bytes_out"] == sum(v.nbytes for v in out.values()) + \
        8 * len(reply["metrics"]) + sum(len(v) for v in reply["fingerprint"].values())
    assert trained.detail["metrics"] == sorted(reply["metrics"])
    assert trained.detail["text"] == sorted(f"fingerprint.{k}" for k in reply["fingerprint"])
    # The file's digest leaves keyed, never as the plain SHA-256 anyone could confirm.
    assert sorted(reply["fingerprint"]) == ["content-hmac", "n-rows", "n-test", "n-train",
                                            "schema-hash"]
    plain = hashlib.sha256(site.csv_path.read_bytes()).hexdigest()
    assert plain not in json.dumps(reply) and plain not in log.path.read_text()
    text = log.path.read_text()
    for name in ("eval-loss", "eval-accuracy", "eval-auc"):
        assert repr(reply["metrics"][name]) not in text, name
    first_row = site.csv_path.read_text().splitlines()[1].split(",")
    assert all(cell not in text for cell in first_row if len(cell) > 3)


def test_a_log_that_cannot_be_written_refuses_the_task(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_bytes(b"damaged last entry\n")
    trainer = WarmTrainer(site_name="hospital-a", task="breast_cancer_mlp", data=None,
                          ledger=PrivacyLedger(tmp_path / "ledger.sqlite"),
                          replies_dir=tmp_path / "replies", audit=AuditLog(path),
                          data_failure={"problems": []})
    reply, out = trainer.handle({"kind": "train", "config": {}}, {})
    assert out == {}
    assert reply["error"]["code"] == SiteErrorCode.REFUSED_POLICY
    assert reply["error"]["reason"].startswith(
        "refused-policy: the site cannot write its audit log")


# --- CLI ----------------------------------------------------------------------------------


def test_cli_verify_reports_intact_and_broken(tmp_path: Path,
                                              make_log: Callable[[int], AuditLog]) -> None:
    runner = CliRunner()
    log = make_log(3)
    ok = runner.invoke(site_cli, ["audit", "verify", "--dir", str(tmp_path)])
    assert ok.exit_code == 0
    assert "audit log intact: 3 entries" in ok.output
    head = read_entries(log.path)[1].head_hash
    assert head in ok.output.replace("\n", "")

    edit_detail(log.path, 1, run="r-9")
    bad = runner.invoke(site_cli, ["audit", "verify", "--dir", str(tmp_path)])
    assert bad.exit_code == 1
    assert "entry 2 is broken: its content does not match its hash (the entry was edited)" \
        in bad.output.replace("\n", " ")


def test_cli_show_filters_by_run_and_last(tmp_path: Path,
                                          make_log: Callable[[int], AuditLog]) -> None:
    make_log(6)
    runner = CliRunner()
    res = runner.invoke(site_cli, ["audit", "show", "--dir", str(tmp_path), "--run", "r-1",
                                   "--json"])
    assert res.exit_code == 0, res.output
    shown = [json.loads(line) for line in res.output.splitlines()]
    assert [e["seq"] for e in shown] == [2, 4, 6]
    res = runner.invoke(site_cli, ["audit", "show", "--dir", str(tmp_path), "--last", "2",
                                   "--json"])
    assert [json.loads(line)["seq"] for line in res.output.splitlines()] == [5, 6]
    table = runner.invoke(site_cli, ["audit", "show", "--dir", str(tmp_path), "--last", "1"])
    assert table.exit_code == 0 and "round-trained" in table.output


def test_cli_show_warns_about_a_broken_log(tmp_path: Path,
                                           make_log: Callable[[int], AuditLog]) -> None:
    log = make_log(4)
    with log.path.open("ab") as fh:
        fh.write(b'{"seq": 5')
    res = CliRunner().invoke(site_cli, ["audit", "show", "--dir", str(tmp_path), "--json"])
    assert res.exit_code == 1
    assert "entry 5 is broken" in res.output
    assert os.path.getsize(log.path) > 0


def test_cli_fingerprint_recomputes_what_leaves_and_reveals_the_key_on_record(
        tmp_path: Path) -> None:
    fed = write_demo_federation(task="breast_cancer_mlp", out_dir=tmp_path / "fed", n_sites=2)
    site, root = fed.sites[0], tmp_path / "site"
    ca = tmp_path / "ca.pem"
    ca.write_text("placeholder: init only copies it\n")
    runner = CliRunner()
    done = runner.invoke(site_cli, ["init", "--dir", str(root), "--name", "hospital-a",
                                    "--superlink", "127.0.0.1:9092", "--ca-cert", str(ca),
                                    "--data", str(site.csv_path),
                                    "--schema", str(site.schema_path)])
    assert done.exit_code == 0, done.output
    # What the agent sends (the key is made at first use, by whichever comes first).
    shown = runner.invoke(site_cli, ["fingerprint", "--dir", str(root)])
    assert shown.exit_code == 0, shown.output
    key = (root / "keys" / FINGERPRINT_KEY_FILE).read_bytes()
    sent = load_site_data(csv_path=site.csv_path, schema=load_schema(site.schema_path),
                          fingerprint_key=key).fingerprint.content_hmac
    assert sent is not None and f"content-hmac: {sent}" in shown.output
    assert key.hex() not in shown.output.replace("\n", "")
    assert not (root / "audit.log").exists()

    revealed = runner.invoke(site_cli, ["fingerprint", "--dir", str(root), "--reveal-key"],
                             )
    assert revealed.exit_code == 0, revealed.output
    assert f"fingerprint key (hex): {key.hex()}" in revealed.output
    command = next(line.strip() for line in revealed.output.splitlines()
                   if line.strip().startswith("openssl dgst"))
    auditor = subprocess.run(command.split(), capture_output=True, text=True, timeout=30,
                             check=True)
    assert auditor.stdout.strip().endswith(sent)
    entries, verdict = read_entries(root / "audit.log")
    assert verdict.intact and [e.action for e in entries] == ["fingerprint-key-revealed"]
