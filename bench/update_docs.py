"""Copy the latest results tables from ``bench/results/`` into ``docs/benchmarks.md``.

Each benchmark's table lives in the docs between two markers::

    <!-- results:scale_sim -->
    ... replaced by bench/results/scale_sim.md, verbatim ...
    <!-- /results:scale_sim -->

and ``<!-- results:provenance -->`` holds a table built from every ``results/<name>.json``:
the commit each was measured at, whether the working tree differed from it, when, how long,
and the 1-minute load average at its start and end. Text outside the markers (methods,
readings) is left alone: after a rerun, check that what it says still matches the tables.

``bench/run_all.py`` calls this after the benchmarks; alone::

    .venv/bin/python bench/update_docs.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOC = ROOT / "docs" / "benchmarks.md"

# Number, results name, script: the order of the list.
BENCHMARKS: list[tuple[str, str, str]] = [
    ("1", "round_overhead", "round_overhead.py"),
    ("1b", "prod_path", "prod_path.py"),
    ("2", "scale_sim", "scale_sim.py"),
    ("3", "dp_cost", "dp_cost.py"),
    ("4", "utility", "utility.py"),
    ("5", "exports", "exports.py"),
    ("6", "signing", "signing.py"),
    ("7", "api_load", "api_load.py"),
    ("8", "tuning", "tuning.py"),
    ("10", "noise_search", "noise_search.py"),
    ("11", "study_demo", "study_demo.py"),
    ("12", "secagg_rounds", "secagg_rounds.py"),
]


def provenance_of(data: dict[str, Any]) -> dict[str, Any]:
    """A results file's provenance; for files written before ``benchutil.provenance``
    existed (benchmark 1's ``code`` and per-run load averages), what they recorded, marked
    ``legacy``."""
    prov = data.get("provenance")
    if prov:
        return dict(prov)
    code = data.get("code") or {}
    head = code.get("git_head")
    runs = data.get("runs") if data.get("benchmark") == "round_overhead" else None
    starts = [r["loadavg_before"][0] for side in (runs or {}).values()
              for by_side in side.values() for r in by_side if r.get("loadavg_before")]
    changed = code.get("appliance_files_changed_since_head")
    return {
        "legacy": True,
        "commit": head[:7] if head else None,
        "dirty": None if changed is None else changed > 0,
        "dirty_files": changed,
        "started_at": data.get("started_at"),
        "finished_at": data.get("finished_at"),
        "wall_seconds": data.get("wall_seconds") or data.get("seconds"),
        "load_1min_start": starts[0] if starts else None,
        "load_1min_end": (data.get("machine") or {}).get("loadavg_1_5_15", [None])[0],
    }


def _when(stamp: str | None) -> str:
    return f"{stamp[:10]} {stamp[11:16]}" if stamp else "-"


def _load(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def provenance_table() -> str:
    lines = ["| # | benchmark | commit | working tree | finished | "
             "minutes | 1-min load at start | at end |", "|---|---|---|---|---|---|---|---|"]
    for num, name, script in BENCHMARKS:
        path = RESULTS / f"{name}.json"
        if not path.exists():
            lines.append(f"| {num} | `{script}` | no results | | | | | |")
            continue
        p = provenance_of(json.loads(path.read_text(encoding="utf-8")))
        if p.get("dirty") is None:
            tree = "not recorded"
        elif p["dirty"]:
            tree = f"{p.get('dirty_files')} file(s) uncommitted"
            if p.get("legacy"):
                tree += " (appliance packages only)"
        else:
            tree = "clean" + (" (appliance packages)" if p.get("legacy") else "")
        wall = p.get("wall_seconds")
        commit = f"`{p['commit']}`" if p.get("commit") else "not recorded"
        if p.get("commit_changed_during_run"):
            commit += f" (HEAD moved to `{p.get('commit_at_end')}` during the run)"
        if p.get("legacy"):
            commit += (" (written before the provenance fields; start load = its first "
                       "run's)" if name == "round_overhead" else
                       " (written before the provenance fields: end load only)")
        lines.append(f"| {num} | `{script}` | {commit} | {tree} | {_when(p.get('finished_at'))} "
                     f"{(p.get('finished_at') or '')[19:]} | "
                     f"{'-' if wall is None else f'{wall / 60:.1f}'} | "
                     f"{_load(p.get('load_1min_start'))} | {_load(p.get('load_1min_end'))} |")
    return "\n".join(lines) + "\n"


def block(name: str) -> str:
    """The text that goes between a benchmark's markers."""
    md_path = RESULTS / f"{name}.md"
    if not md_path.exists():
        return f"*No results yet: run `bench/{name}.py`.*\n"
    md = md_path.read_text(encoding="utf-8").strip() + "\n"
    data = json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))
    if "provenance" not in data:
        p = provenance_of(data)
        md = (f"*Measured at commit `{p['commit'] or 'not recorded'}`, finished "
              f"{_when(p['finished_at'])}, "
              f"{(p['wall_seconds'] or 0) / 60:.1f} min; 1-minute load average "
              f"{_load(p['load_1min_start'])} at the first run's start, "
              f"{_load(p['load_1min_end'])} at the end (recorded before the provenance "
              "fields existed).*\n\n" + md)
    return md


def render(doc: str) -> tuple[str, list[str]]:
    """``doc`` with every marked block replaced; and the markers that were missing."""
    missing: list[str] = []
    blocks = {name: block(name) for _, name, _ in BENCHMARKS}
    blocks["provenance"] = provenance_table()
    for name, text in blocks.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)",
                             re.DOTALL)
        if not pattern.search(doc):
            missing.append(name)
            continue
        doc = pattern.sub(lambda m, t=text: m.group(1) + t + m.group(2), doc)
    return doc, missing


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="change nothing; exit 1 if the docs differ from bench/results")
    args = ap.parse_args()
    old = DOC.read_text(encoding="utf-8")
    new, missing = render(old)
    if missing:
        print(f"{DOC.relative_to(ROOT)} lacks the markers for: {', '.join(missing)}",
              file=sys.stderr)
    if args.check:
        same = new == old
        print("docs match bench/results" if same else "docs differ from bench/results")
        return 0 if same and not missing else 1
    if new != old:
        tmp = DOC.with_suffix(".md.tmp")
        tmp.write_text(new, encoding="utf-8")
        tmp.replace(DOC)
        print(f"updated {DOC.relative_to(ROOT)}")
    else:
        print(f"{DOC.relative_to(ROOT)} already matches bench/results")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
