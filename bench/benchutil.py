"""Shared helpers of the benchmarks 1-7: machine facts, provenance, medians, results files,
memory.

Every benchmark writes ``bench/results/<name>.json`` (all raw figures) and
``bench/results/<name>.md`` (the table that goes into ``docs/benchmarks.md``), prints the
table, and states in both how far its repetitions were scaled down. Both files carry the
provenance (:func:`provenance`): the git commit measured, whether the working tree differed
from it, and the machine's 1-minute load average when the benchmark started and ended.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

# The benchmarks import the appliance's packages from the repository root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# No usage reporting from anything a benchmark starts (Flower, Ray).
QUIET_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
}
os.environ.update(QUIET_ENV)

# When this benchmark started: the first import of this module, or mark_start().
_START: dict[str, Any] = {}


def mark_start() -> None:
    """Record the start of a benchmark: clocks, the load average and the git state.

    Called when this module is first imported (a benchmark script imports it at its top), so
    a script needs to call it only to restart the clock.
    """
    _START.update(started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), t0=time.monotonic(),
                  load_1min=round(os.getloadavg()[0], 2), git=git_state())


def git_state() -> dict[str, Any]:
    """The commit the benchmark measured and whether the working tree differed from it.

    ``dirty`` counts changed and untracked files anywhere in the checkout except
    ``bench/results/`` (the benchmarks' own output); ``dirty_paths`` names up to 30 of them
    so that a reader can judge whether they touch what was measured.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                              text=True, timeout=30, check=True).stdout

    try:
        short = git("rev-parse", "--short", "HEAD").strip()
        full = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=all")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "commit_full": None, "dirty": None, "dirty_paths": [],
                "note": "not a git checkout (or git missing)"}
    paths = [line[3:] for line in status.splitlines()
             if not line[3:].startswith("bench/results/")]
    return {"commit": short, "commit_full": full, "dirty": bool(paths),
            "dirty_files": len(paths), "dirty_paths": paths[:30]}


mark_start()


def provenance() -> dict[str, Any]:
    """Commit, dirty flag and the 1-minute load average at this benchmark's start and now.

    ``commit``, ``dirty`` and ``dirty_paths`` are read when the benchmark started (the code a
    benchmark imports is the code it measures); ``commit_at_end`` says where HEAD was when it
    finished, and ``commit_changed_during_run`` whether someone committed in between.
    """
    start, end = dict(_START["git"]), git_state()
    return {
        **start,
        "commit_at_end": end.get("commit"),
        "commit_changed_during_run": start.get("commit") != end.get("commit"),
        "started_at": _START["started_at"],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_seconds": round(time.monotonic() - _START["t0"], 1),
        "load_1min_start": _START["load_1min"],
        "load_1min_end": round(os.getloadavg()[0], 2),
        "nproc": len(os.sched_getaffinity(0)),
    }


def provenance_line(prov: dict[str, Any]) -> str:
    """One markdown line stating what a results table measured, where and under what load."""
    commit = f"`{prov['commit']}`" if prov.get("commit") else "unknown commit"
    if prov.get("dirty"):
        commit += f" with {prov['dirty_files']} uncommitted file(s) in the working tree"
    elif prov.get("dirty") is False:
        commit += " (clean working tree)"
    if prov.get("commit_changed_during_run"):
        commit += f" (HEAD moved to `{prov.get('commit_at_end')}` during the run)"
    when = prov["finished_at"]  # 2026-11-29T05:20:25+0000
    return (f"*Measured at commit {commit}, finished {when[:10]} {when[11:16]} {when[19:]}, "
            f"{prov['wall_seconds'] / 60:.1f} min; 1-minute load average "
            f"{prov['load_1min_start']:.2f} at start, {prov['load_1min_end']:.2f} at end, on "
            f"{prov['nproc']} CPUs.*\n\n")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so that ``finally`` blocks and context managers clean
    up (child processes stopped by PID, temporary folders removed) when a driver such as
    ``run_all.py`` stops a benchmark at its time limit."""
    import signal

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def median(values: Iterable[float]) -> float:
    vals = [float(v) for v in values]
    return statistics.median(vals) if vals else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, like numpy's default."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return float("nan")
    pos = (len(vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def machine() -> dict[str, Any]:
    """The facts docs/benchmarks.md reports about the machine and the stack."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    info: dict[str, Any] = {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "ram_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other work on a shared machine skews absolute times: record how busy it was.
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }
    for mod in ("torch", "flwr", "opacus", "onnxruntime", "ray"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod)
        except Exception:
            info[mod] = None
    return info


def write_results(name: str, data: dict[str, Any], md: str) -> tuple[Path, Path]:
    """Write ``results/<name>.json`` and ``results/<name>.md`` atomically; print the table.

    Both get the provenance (commit, dirty flag, load at start and end): the JSON under
    ``provenance``, the markdown as its first line.
    """
    RESULTS.mkdir(exist_ok=True)
    prov = provenance()
    data = {"benchmark": name, "provenance": prov, "machine": machine(),
            "finished_at": prov["finished_at"], **data}
    md = provenance_line(prov) + md
    jpath, mpath = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    for path, text in ((jpath, json.dumps(data, indent=2, default=str) + "\n"), (mpath, md)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    print(md)
    print(f"wrote {jpath.relative_to(ROOT)} and {mpath.relative_to(ROOT)}")
    return jpath, mpath


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None or x != x:  # None or NaN
        return "-"
    return f"{x:.{digits}f}"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# --- memory of a process tree, from /proc (psutil is not a dependency) ---------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2:].split()
        kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def process_tree(root: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(kids.get(pid, []))
    return out


def _kb(path: str, keys: tuple[str, ...]) -> dict[str, int]:
    got: dict[str, int] = {}
    try:
        for line in Path(path).read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in keys:
                got[key] = int(line.split()[1])
    except OSError:
        pass
    return got


def tree_memory_mib(root: int) -> dict[str, float]:
    """RSS and PSS (MiB) summed over ``root`` and all its descendants, and their count.

    RSS counts shared pages once per process (it overstates a tree of forked workers);
    PSS splits each shared page among the processes that map it, so its sum is the tree's
    real share of memory.
    """
    rss = pss = 0
    pids = process_tree(root)
    for pid in pids:
        rss += _kb(f"/proc/{pid}/status", ("VmRSS",)).get("VmRSS", 0)
        pss += _kb(f"/proc/{pid}/smaps_rollup", ("Pss",)).get("Pss", 0)
    return {"rss_mib": rss / 1024, "pss_mib": pss / 1024, "processes": len(pids)}


class PeakMemory:
    """Sample a process tree's memory in a thread; keep the peaks."""

    def __init__(self, root: int | None = None, interval_s: float = 0.25) -> None:
        self.root = root if root is not None else os.getpid()
        self.interval_s = interval_s
        self.peak_rss_mib = 0.0
        self.peak_pss_mib = 0.0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="peak-memory")

    def _loop(self) -> None:
        while not self._stop.is_set():
            m = tree_memory_mib(self.root)
            self.peak_rss_mib = max(self.peak_rss_mib, m["rss_mib"])
            self.peak_pss_mib = max(self.peak_pss_mib, m["pss_mib"])
            self.peak_processes = max(self.peak_processes, int(m["processes"]))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
