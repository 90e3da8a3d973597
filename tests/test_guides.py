"""The guides, followed literally: every command block runs, in the order a reader meets it.

A real coordinator and two real site agents (hospital-a, hospital-b) on 127.0.0.1, each
reader in a shell of its own with its own home directory: the ML team on the coordinator's
host, hospital IT at each site, a clinician. ``tests/guide_blocks.py`` holds the convention
(which blocks run, the ``guide-test`` directives, the example values replaced). The only
things the test does that a guide does not say are what a reader brings: the hospitals'
CSV files (``fedward-site demo-data``), free ports instead of 8600 and 9092
(``FEDWARD_API_PORT``, ``FEDWARD_FLEET_PORT``), and the clinician's two downloads from the
release portal (the bundle and the release key, fetched over HTTP as the portal's buttons
do).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest
from guide_blocks import EXAMPLE_VALUES, GuideError, read_blocks, substitute
from guide_reading import (
    BIN,
    ORDERS,
    READING_ORDER,
    TOTAL_TIMEOUT_S,
    Reader,
    Reading,
    all_blocks,
    base_vars,
    entries_of,
    follow,
    hospital_readers,
    reader_env,
    run_block,
)

SITES = ("hospital-a", "hospital-b")

# ---------------------------------------------------------------------------- fast checks


def test_every_block_is_read_and_every_skip_says_why() -> None:
    """The markdown follows the convention: closed fences, known directives, skip reasons."""
    blocks = all_blocks()     # raises GuideError with file:line otherwise
    assert sum(b.is_command for bs in blocks.values() for b in bs) > 20
    for bs in blocks.values():
        for b in bs:
            if "skip" in b.directives:
                assert b.is_command, f"{b.where}: a skip on a block that never runs"
                assert len((b.option("skip", "reason") or "").split()) >= 3, (
                    f"{b.where}: say in a few words why the block cannot run in a test")


def test_every_section_with_commands_is_in_the_reading_order() -> None:
    """A section another writer adds is placed in READING_ORDER, not silently left out."""
    for guide, bs in all_blocks().items():
        for b in bs:
            if b.is_command and "skip" not in b.directives:
                taken = [e for order in ORDERS for e in entries_of(b, guide, order)]
                assert len(taken) == 1, (
                    f"{b.where}: this command block is in {len(taken)} entries of "
                    f"READING_ORDER and WALKTHROUGH_ORDER in tests/guide_reading.py "
                    f"({taken}): place its section exactly once, where a reader would run it")


def test_every_command_block_can_be_pasted() -> None:
    """No `<placeholder>` or `[--option]` synopsis in a block that runs (checked fast)."""
    values = {name: f"/example/{name}" for name in EXAMPLE_VALUES.values()}
    for bs in all_blocks().values():
        for b in bs:
            if b.is_command and "skip" not in b.directives:
                substitute(b, values)   # raises GuideError naming the file and line


def test_placeholders_and_synopses_are_refused(tmp_path: Path) -> None:
    """A `<placeholder>` or `[--option]` in a command block fails, naming its line."""
    md = tmp_path / "g.md"
    md.write_text("# G\n\n## S\n\n```\nfedward-site start --dir /var/lib/fedward/site "
                  "[--epsilon-cap 3]\n```\n\n<!-- guide-test: skip reason=\"x y z\" -->\n"
                  "```\napt install x\n```\n\n```\ncat <release-id>.tar.gz\n```\n")
    blocks = read_blocks(md, root=tmp_path)
    assert blocks[1].directives == {"skip": ["reason=x y z"]}
    with pytest.raises(GuideError, match=r"g.md:6: '\[--e'"):
        substitute(blocks[0], {"SITE_DIR": "/tmp/s"})
    with pytest.raises(GuideError, match=r"g.md:15: '<release-id>'"):
        substitute(blocks[2], {})
    md.write_text("<!-- guide-test: skip -->\n```\napt install x\n```\n")
    with pytest.raises(GuideError, match="needs reason="):
        read_blocks(md)
    md.write_text("<!-- guide-test: skipp reason=x -->\n```\nls\n```\n")
    with pytest.raises(GuideError, match="unknown guide-test directive"):
        read_blocks(md)


def test_the_harness_keeps_shell_state_pastes_and_names_the_failing_line(
        tmp_path: Path) -> None:
    """Variables carry over, a copied value is pasted, a background block is stopped, and a
    failing command is reported with its file and line."""
    md = tmp_path / "g.md"
    md.write_text("# G\n\n<!-- guide-test: copy SECRET=tok-[a-z]+ -->\n```\n"
                  "X=42\necho tok-abc\n```\n\n<!-- guide-test: paste SECRET -->\n```\n"
                  "read -r Y\ntest \"$X $Y\" = \"42 tok-abc\"\n```\n\n"
                  "<!-- guide-test: background ready=serving -->\n```\n"
                  "echo serving; sleep 600\n```\n\n```\necho one\nfalse\necho two\n```\n")
    blocks = read_blocks(md, root=tmp_path)
    reading = Reading(work=tmp_path, base_vars=base_vars())
    reader = Reader("r", tmp_path / "desk", {"PATH": os.environ["PATH"]}, {})
    try:
        for b in blocks[:3]:
            run_block(reading, reader, b)
        bg = reading.background[0][1]
        assert bg.poll() is None
        with pytest.raises(pytest.fail.Exception, match=r"g.md:22 \(line 2 of the block at "
                                                        r"g.md:20"):
            run_block(reading, reader, blocks[3])
    finally:
        reading.stop_all()
    assert bg.poll() is not None


def test_the_cli_names_home_and_token_settings_on_a_401(tmp_path: Path) -> None:
    """`fedward-coordinator sites` without the data directory: the 401 says what to set."""
    from coordinator.api import create_app
    from coordinator.db import make_engine, run_migrations
    from coordinator.settings import Settings

    from tests_support import served_app

    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'coordinator.db'}"
    run_migrations(url)
    engine = make_engine(url)
    try:
        with served_app(create_app(settings=Settings(home=home), engine=engine),
                        name="guides-401") as port:
            env = {k: v for k, v in os.environ.items()
                   if k not in ("FEDWARD_TOKEN", "FEDWARD_HOME")}
            env.update(FEDWARD_API=f"http://127.0.0.1:{port}", HOME=str(tmp_path),
                       COLUMNS="200", NO_COLOR="1")
            res = subprocess.run([str(BIN / "fedward-coordinator"), "sites"], env=env,
                                 capture_output=True, text=True, timeout=120, check=False)
            wrong = subprocess.run([str(BIN / "fedward-coordinator"), "sites", "--token",
                                    "not-a-token"], env=env, capture_output=True, text=True,
                                   timeout=120, check=False)
    finally:
        engine.dispose()
    for r in (res, wrong):
        assert r.returncode == 1, r.stdout + r.stderr
        text = " ".join(r.stderr.split())
        assert "401" in text
        for word in ("--home", "FEDWARD_HOME", "FEDWARD_TOKEN", "--token"):
            assert word in text, text
    assert "no admin token file at" in " ".join(res.stderr.split())
    assert "came from --token" in " ".join(wrong.stderr.split())


# ---------------------------------------------------------------------------- the reading


def _readers(work: Path) -> dict[str, Reader]:
    """The ML team, each hospital's IT and a clinician, each with its own home."""
    env, common = reader_env(work)
    return {"ml": Reader("ml", work / "ml" / "desk", {**env, "HOME": str(work / "ml")},
                         common),
            "clinician": Reader("clinician", work / "clinician" / "desk",
                                {**env, "HOME": str(work / "clinician")}, common),
            **hospital_readers(work, SITES, env, common)}


def _clinician_downloads(reader: Reader, ml: Reader) -> None:
    """What the portal's "Download bundle" and key buttons give the clinician."""
    api = ml.values["PORTAL_URL"] + "/api/v1"
    token = (Path(ml.values["COORDINATOR_HOME"]) / "admin.token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    releases = httpx.get(f"{api}/releases", headers=headers, timeout=30).json()
    assert releases, "the ML team guide approved no release for the clinician to use"
    rid = releases[0]["release_id"] if "release_id" in releases[0] else releases[0]["id"]
    bundle = httpx.get(f"{api}/releases/{rid}/bundle", headers=headers, timeout=60)
    assert bundle.status_code == 200, bundle.text
    (reader.cwd / f"{rid}.tar.gz").write_bytes(bundle.content)
    key = httpx.get(f"{api}/release-key.pem", timeout=30)
    assert key.status_code == 200, key.text
    (reader.cwd / "release.pub.pem").write_bytes(key.content)


@pytest.mark.integration
@pytest.mark.timeout(TOTAL_TIMEOUT_S + 240)
def test_the_guides_run_as_written(reading: Reading) -> None:
    """Every command block of the guides, in reading order, against real processes."""
    blocks = all_blocks()
    readers = _readers(reading.work)
    for index, (who, _guide, _sections) in enumerate(READING_ORDER):
        if who == "clinician":
            _clinician_downloads(readers["clinician"], readers["ml"])
        follow(reading, readers, READING_ORDER, index, blocks, SITES)
    assert reading.ran > 20
    assert set(EXAMPLE_VALUES.values()) <= set(readers["hospital-a"].values)
