"""Following the guides as their readers do: a shell per reader, a clipboard, background
processes, each command block run as pasted.

``test_guides.py`` reads the guides in :data:`READING_ORDER` with two hospitals;
``test_walkthrough.py`` reads the study walkthrough (:data:`WALKTHROUGH_ORDER`) with three,
from an empty coordinator. Every command block that runs belongs to exactly one entry of one
of the two orders (``test_guides.py`` checks it). ``guide_blocks.py`` holds the convention of
the blocks themselves.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
from guide_blocks import Block, GuideError, read_blocks, substitute

from fedward.procs import descendants, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README = Path("README.md")
ML = Path("docs/ml-team-guide.md")
OPERATOR = Path("docs/operator-guide.md")
CLINICIAN = Path("docs/clinician.md")
GUIDES = (README, ML, OPERATOR, CLINICIAN)

BLOCK_TIMEOUT_S = 420.0     # one block (`watch` of a whole run, `release propose` are the longest)
TOTAL_TIMEOUT_S = 1800.0    # the whole reading (2 shared cores: 946 s; over 1500 s at load 25)
READY_TIMEOUT_S = 120.0     # a background block's ready line
LIFETIME_S = int(TOTAL_TIMEOUT_S) + 300   # no process the test starts outlives this

Order = tuple[tuple[str, Path, tuple[str, ...]], ...]
"""(reader, guide, sections): see :data:`READING_ORDER`."""

# The order a reader follows: (reader, file, sections). A section is a heading below the
# file's title, or "Heading > Subheading" for a part of it; "" is the text above the first
# one. The reader "site" stands for each hospital in SITES, one after the other. Every
# command block must fall in exactly one entry (checked), so a section another writer adds
# fails the test, naming it, until it is placed here.
READING_ORDER: Order = (
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



_WALK = "Walkthrough: a new study at three hospitals"
# The study walkthrough, from an empty coordinator to a study's first rounds at three
# hospitals: the ML team's part, each hospital's (at the same time), the ML team's launch.
WALKTHROUGH_ORDER: Order = (
    ("ml", ML, (f"{_WALK} > 1. Start an empty coordinator",
                f"{_WALK} > 2. Write the study and register it",
                f"{_WALK} > 3. Invite the hospitals")),
    ("site", OPERATOR, ("Walkthrough: joining a new study",)),
    ("ml", ML, (f"{_WALK} > 4. Launch and watch the first rounds",)),
)
ORDERS: tuple[Order, ...] = (READING_ORDER, WALKTHROUGH_ORDER)

def in_section(block: Block, spec: str) -> bool:
    """Whether ``block`` lies under ``spec`` ("Heading" or "Heading > Subheading")."""
    path = tuple(part.strip() for part in spec.split(">")) if spec else ()
    below_title = block.section[1:]
    if not path:
        return not below_title
    return below_title[:len(path)] == path


def entries_of(block: Block, guide: Path, order: Order) -> list[tuple[int, str]]:
    """The entries (index, section) of ``order`` that take ``block``."""
    return [(i, spec) for i, (_r, f, specs) in enumerate(order) if f == guide
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


def base_vars() -> str:
    """The variables of a fresh bash (plus the save loop's own): not a reader's state."""
    base = subprocess.run(["bash", "-c", "compgen -v"], capture_output=True, text=True,
                          check=True, env={"PATH": os.environ["PATH"]}).stdout.split()
    return " ".join([*base, "__v"])


def reader_env(work: Path) -> tuple[dict[str, str], dict[str, str]]:
    """The environment every reader's shell starts from, and the values all readers share
    (the coordinator's data directory, the fleet address, the portal): free ports stand for
    the defaults a reader would keep (8600, 9092)."""
    api_port, fleet_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDWARD_", "FLWR_"))}
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONPATH=str(ROOT),
        FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
        FEDWARD_API_PORT=str(api_port), FEDWARD_FLEET_PORT=str(fleet_port),
        COLUMNS="120", NO_COLOR="1", TERM="dumb")
    common = {"VENV": str(BIN.parent), "COORDINATOR_HOME": str(work / "ml" / "coordinator"),
              "FLEET_ADDRESS": f"127.0.0.1:{fleet_port}",
              "PORTAL_URL": f"http://127.0.0.1:{api_port}"}
    return env, common


def hospital_readers(work: Path, sites: tuple[str, ...], env: dict[str, str],
                     common: dict[str, str]) -> dict[str, Reader]:
    """Each hospital's IT, with its own home and its own table (``/data/cohort.csv``: a
    part of ``fedward-site demo-data``, what the hospital brings)."""
    demo = json.loads(subprocess.run(
        [str(BIN / "fedward-site"), "demo-data", "--out", str(work / "demo"), "--sites",
         str(len(sites))], capture_output=True, text=True, check=True, timeout=120,
        env=env).stdout)
    readers = {}
    for site, part in zip(sites, demo["sites"], strict=True):
        home = work / site
        data = home / "data"
        data.mkdir(parents=True)
        shutil.copyfile(part["csv"], data / "cohort.csv")   # the hospital's own CSV
        readers[site] = Reader(site, home / "desk", {**env, "HOME": str(home)}, {
            **common, "SITE_DIR": str(home / "site"), "DATA_PATH": str(data / "cohort.csv"),
            "SCHEMA_PATH": str(data / "cohort.schema.json"),
            "STUDY_PATH": str(data / "tumour_shape.yaml"),
            "MAPPING_PATH": str(data / "tumour-mapping.yaml")}, site=site)
    return readers


def follow(reading: Reading, readers: dict[str, Reader], order: Order, index: int,
           blocks: dict[Path, list[Block]], sites: tuple[str, ...]) -> None:
    """Run the command blocks of entry ``index`` of ``order`` as its reader; the reader
    "site" is each hospital of ``sites``, all at the same time, as they would."""
    who, guide, _sections = order[index]
    mine = [b for b in blocks[guide] if b.is_command and "skip" not in b.directives
            and [i for i, _ in entries_of(b, guide, order)] == [index]]

    def read(name: str) -> None:
        for block in mine:
            run_block(reading, readers[name], block)

    names = sites if who == "site" else (who,)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        for future in [pool.submit(read, name) for name in names]:
            future.result()
