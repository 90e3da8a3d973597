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

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
from guide_blocks import EXAMPLE_VALUES, Block, GuideError, read_blocks, substitute

from fedward.procs import descendants, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README = Path("README.md")
ML = Path("docs/ml-team-guide.md")
OPERATOR = Path("docs/operator-guide.md")
CLINICIAN = Path("docs/clinician.md")
GUIDES = (README, ML, OPERATOR, CLINICIAN)
SITES = ("hospital-a", "hospital-b")

BLOCK_TIMEOUT_S = 420.0     # one block (`watch` of a whole run, `release propose` are the longest)
TOTAL_TIMEOUT_S = 1800.0    # the whole reading (2 shared cores: 946 s; over 1500 s at load 25)
READY_TIMEOUT_S = 120.0     # a background block's ready line
LIFETIME_S = int(TOTAL_TIMEOUT_S) + 300   # no process the test starts outlives this

# The order a reader follows: (reader, file, sections). A section is a heading below the
# file's title, or "Heading > Subheading" for a part of it; "" is the text above the first
# one. The reader "site" stands for each hospital in SITES, one after the other. Every
# command block must fall in exactly one entry (checked), so a section another writer adds
# fails the test, naming it, until it is placed here.
READING_ORDER: tuple[tuple[str, Path, tuple[str, ...]], ...] = (
    ("ml", README, ("",)),
    ("ml", ML, ("Set up the coordinator", "Add a site")),
    ("site", OPERATOR, ("What the site agent is", "Firewall", "Install", "Set up the site",
                        "Isolation from other local accounts")),
    ("ml", ML, ("Launch and watch a run", "Tasks", "Studies", "Round time",
                "Releases > Users, passwords and roles", "Releases > Model versions and lineage",
                "Releases > Candidates and gates", "Releases > How sites measure parity",
                "Releases > Approval and the signed bundle")),
    ("clinician", CLINICIAN, ("3. Download and verify", "4. Run it locally")),
    ("ml", ML, ("Releases > Downloads and revocation",
                "Releases > Site parity and the coordinator", "Drift of released models",
                "MLflow hand-off")),
    ("site", OPERATOR, ("What leaves the site", "Site policy", "Approving runs",
                        "Privacy budget", "Audit log", "Drift checks of a released model",
                        "Doctor", "The data directory",
                        "When something goes wrong")),
)


def in_section(block: Block, spec: str) -> bool:
    """Whether ``block`` lies under ``spec`` ("Heading" or "Heading > Subheading")."""
    path = tuple(part.strip() for part in spec.split(">")) if spec else ()
    below_title = block.section[1:]
    if not path:
        return not below_title
    return below_title[:len(path)] == path


def entries_of(block: Block, guide: Path) -> list[tuple[int, str]]:
    """The READING_ORDER entries (index, section) that take ``block``."""
    return [(i, spec) for i, (_r, f, specs) in enumerate(READING_ORDER) if f == guide
            for spec in specs if in_section(block, spec)]


@dataclass
class Reader:
    """One person's terminal: a working folder, an environment, the shell's variables."""

    name: str
    cwd: Path
    env: dict[str, str]
    values: dict[str, str]
    site: str | None = None
    state: Path = field(init=False)

    def __post_init__(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.state = self.cwd.parent / f".{self.name}.shell-state"
        self.state.write_text("")


@dataclass
class Reading:
    """What the readers share: the clipboard, the background processes, the clock."""

    work: Path
    started: float = field(default_factory=time.monotonic)
    clipboard: dict[str, list[str]] = field(default_factory=dict)
    background: list[tuple[Block, subprocess.Popen[bytes]]] = field(default_factory=list)
    base_vars: str = ""
    ran: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def stop_all(self) -> None:
        """Stop every background process the reading started (by PID), newest first."""
        for _block, proc in reversed(self.background):
            tree = descendants(proc.pid)
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            for pid in [proc.pid, *tree]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=10)


def _script(reading: Reading, reader: Reader, block: Block, text: str, number: int) -> Path:
    """A bash script running ``text`` in the reader's shell state and saving that state."""
    body = reading.work / "blocks" / f"{number:03d}-{reader.name}.sh"
    body.parent.mkdir(exist_ok=True)
    body.write_text(text)
    wrapper = body.with_suffix(".run.sh")
    save = (f'for __v in $(compgen -v); do case " {reading.base_vars} " in *" $__v "*) ;; '
            f'*) declare -p "$__v" 2>/dev/null ;; esac; done > {reader.state}.new && '
            f'mv {reader.state}.new {reader.state}')
    # The ERR trap names the line of the block whose command failed (for a command
    # continued over several lines, its last line).
    trap = """trap 'echo "guide-test: line $LINENO failed" >&2' ERR"""
    wrapper.write_text(f"set -eo pipefail\nsource {reader.state}\ncd {reader.cwd}\n{trap}\n"
                       f"source {body}\ntrap - ERR\n{save}\n")
    return wrapper


def _fail(block: Block, message: str, output: str, body_line: int | None = None) -> NoReturn:
    where = block.where if body_line is None else (
        f"{block.path}:{block.line + body_line} (line {body_line} of the block at "
        f"{block.where})")
    tail = "\n".join(output.splitlines()[-60:])
    pytest.fail(f"guide block {where} {message}\n--- block ---\n{block.text}"
                f"--- output (last 60 lines) ---\n{tail}", pytrace=False)


def _failing_line(output: str, script: str) -> int | None:
    """The block's line that failed, from bash's own message or the ERR trap's."""
    m = (re.search(re.escape(script) + r": line (\d+):", output)
         or re.search(r"guide-test: line (\d+) failed", output))
    return int(m.group(1)) if m else None


def _stdin(reading: Reading, reader: Reader, block: Block) -> str:
    names = block.directives.get("paste", [])
    pasted = []
    for name in names:
        copies = reading.clipboard.get(name)
        if not copies:
            _fail(block, f"pastes {name!r}, which no earlier block copied", "")
        mine = [c for c in copies if reader.site and f".{reader.site}." in c]
        pasted.append((mine or copies)[-1])
    return "".join(p + "\n" for p in pasted)


def run_block(reading: Reading, reader: Reader, block: Block) -> None:
    """Run one command block as ``reader``; fail the test with its file and line if it fails."""
    if time.monotonic() - reading.started > TOTAL_TIMEOUT_S:
        _fail(block, f"not reached: the reading took over {TOTAL_TIMEOUT_S:.0f} s", "")
    try:
        text = substitute(block, reader.values)
    except GuideError as err:
        pytest.fail(str(err), pytrace=False)
    with reading.lock:
        reading.ran += 1
        number = reading.ran
    print(f"[{time.monotonic() - reading.started:6.1f} s] {reader.name}: {block.where}",
          flush=True)
    script = _script(reading, reader, block, text, number)
    body_name = str(script).replace(".run.sh", ".sh")
    log = script.with_suffix(".log")
    if "background" in block.directives:
        ready = block.option("background", "ready")
        if not ready:
            pytest.fail(f"{block.where}: `guide-test: background` needs ready=\"REGEX\" (a "
                        "line the command prints once it serves)", pytrace=False)
        with log.open("wb") as out:
            bg = subprocess.Popen(
                ["timeout", "-k", "5", str(LIFETIME_S), "bash", str(script)],
                cwd=reader.cwd, env=reader.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)
        reading.background.append((block, bg))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not re.search(ready, log.read_text(errors="replace")):
            if bg.poll() is not None:
                _fail(block, f"exited {bg.returncode} before printing {ready!r}",
                      log.read_text(errors="replace"))
            if time.monotonic() > deadline:
                _fail(block, f"did not print {ready!r} within {READY_TIMEOUT_S:.0f} s",
                      log.read_text(errors="replace"))
            time.sleep(0.2)
        return
    expected = int((block.directives.get("exit") or ["0"])[0])
    proc = subprocess.Popen(["bash", str(script)], cwd=reader.cwd, env=reader.env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(_stdin(reading, reader, block),
                                          timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # the block's own session: only what it started
        stdout, stderr = proc.communicate()
        _fail(block, f"did not end within {BLOCK_TIMEOUT_S:.0f} s", stdout + stderr)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    output = res.stdout + res.stderr
    log.write_text(output)
    if res.returncode != expected:
        _fail(block, f"exited {res.returncode} (expected {expected})", output,
              _failing_line(res.stderr, body_name))
    for word in block.directives.get("copy", []):
        name, _, pattern = word.partition("=")
        found = re.findall(pattern, res.stdout)
        if not found:
            _fail(block, f"printed nothing matching {pattern!r} to copy as {name}", output)
        reading.clipboard.setdefault(name, []).extend(
            f if isinstance(f, str) else f[0] for f in found)


def all_blocks() -> dict[Path, list[Block]]:
    return {g: read_blocks(ROOT / g, root=ROOT) for g in GUIDES}


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
                taken = entries_of(b, guide)
                assert len(taken) == 1, (
                    f"{b.where}: this command block is in {len(taken)} entries of "
                    f"READING_ORDER in tests/test_guides.py ({taken}): place its section "
                    "exactly once, where a reader would run it")


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
    base = subprocess.run(["bash", "-c", "compgen -v"], capture_output=True, text=True,
                          check=True).stdout.split()
    reading = Reading(work=tmp_path, base_vars=" ".join([*base, "__v"]))
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


@pytest.fixture
def reading(tmp_path: Path) -> Iterator[Reading]:
    base = subprocess.run(["bash", "-c", "compgen -v"], capture_output=True, text=True,
                          check=True, env={"PATH": os.environ["PATH"]}).stdout.split()
    r = Reading(work=tmp_path, base_vars=" ".join([*base, "__v"]))
    try:
        yield r
    finally:
        r.stop_all()
        if os.environ.get("FEDWARD_TEST_KEEP"):
            print(f"guide reading kept in {tmp_path}")


def _readers(work: Path) -> dict[str, Reader]:
    """The ML team, each hospital's IT and a clinician, each with its own home."""
    api_port, fleet_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDWARD_", "FLWR_"))}
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONPATH=str(ROOT),
        FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
        # The ports a reader would leave at their defaults (8600, 9092), free here.
        FEDWARD_API_PORT=str(api_port), FEDWARD_FLEET_PORT=str(fleet_port),
        COLUMNS="120", NO_COLOR="1", TERM="dumb")
    common = {"VENV": str(BIN.parent), "COORDINATOR_HOME": str(work / "ml" / "coordinator"),
              "FLEET_ADDRESS": f"127.0.0.1:{fleet_port}",
              "PORTAL_URL": f"http://127.0.0.1:{api_port}"}
    readers = {"ml": Reader("ml", work / "ml" / "desk", {**env, "HOME": str(work / "ml")},
                            common),
               "clinician": Reader("clinician", work / "clinician" / "desk",
                                   {**env, "HOME": str(work / "clinician")}, common)}
    demo = json.loads(subprocess.run(
        [str(BIN / "fedward-site"), "demo-data", "--out", str(work / "demo"), "--sites",
         str(len(SITES))], capture_output=True, text=True, check=True, timeout=120,
        env=env).stdout)
    for site, part in zip(SITES, demo["sites"], strict=True):
        home = work / site
        data = home / "data"
        data.mkdir(parents=True)
        shutil.copyfile(part["csv"], data / "cohort.csv")   # the hospital's own CSV
        readers[site] = Reader(site, home / "desk", {**env, "HOME": str(home)}, {
            **common, "SITE_DIR": str(home / "site"), "DATA_PATH": str(data / "cohort.csv"),
            "SCHEMA_PATH": str(data / "cohort.schema.json")}, site=site)
    return readers


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
    for index, (who, guide, _sections) in enumerate(READING_ORDER):
        if who == "clinician":
            _clinician_downloads(readers["clinician"], readers["ml"])
        mine = [b for b in blocks[guide] if b.is_command and "skip" not in b.directives
                and [i for i, _ in entries_of(b, guide)] == [index]]

        def follow(name: str, mine: list[Block] = mine) -> None:
            for block in mine:
                run_block(reading, readers[name], block)

        # Each hospital's IT follows the operator's guide at the same time, as they would.
        names = SITES if who == "site" else (who,)
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            for future in [pool.submit(follow, name) for name in names]:
                future.result()
    assert reading.ran > 20
    assert set(EXAMPLE_VALUES.values()) <= set(readers["hospital-a"].values)
