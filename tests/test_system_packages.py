"""`make test` on a fresh machine: the Debian packages the tests need are installed, or named.

The script `.ci/system-packages` runs first in `make test`. Where a tool is missing and the
script may not install (not root, no apt-get, or FEDWARD_NO_SYSTEM_INSTALL=1), it must stop at
once, naming every missing package and the one command that installs them all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / ".ci" / "system-packages"


def _bare_path(tmp_path: Path, keep: tuple[str, ...]) -> str:
    """A PATH holding only ``keep`` (what the script itself runs), so every tool the tests
    need looks missing."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in keep:
        found = shutil.which(name)
        assert found, f"{name} is needed to run this test"
        (bindir / name).symlink_to(found)
    return str(bindir)


def test_missing_tools_are_named_with_the_command_that_installs_them(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": _bare_path(tmp_path, ("bash", "id", "sort")),
           "FEDWARD_NO_SYSTEM_INSTALL": "1"}
    done = subprocess.run([str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 1
    named = done.stderr.split("not installed: ", 1)[1].splitlines()[0].split()
    assert {"nftables", "iproute2", "chromium", "shellcheck", "docker-compose",
            "util-linux"} <= set(named)
    assert len(named) == len(set(named)), "each package is named once"
    assert f"sudo apt-get install -y -q --no-install-recommends {' '.join(named)}" in done.stderr


def test_a_machine_with_every_tool_passes_the_check() -> None:
    # make test ran the script before the tests, so here everything is installed.
    done = subprocess.run([str(SCRIPT)], env={**os.environ, "FEDWARD_NO_SYSTEM_INSTALL": "1"},
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
