"""What ``fedward-coordinator``'s run control commands compute and print.

``wait`` (exit codes a scheduler gates on: :data:`WAIT_EXIT_CODES`), ``launch --from``
(:func:`relaunch_body`), ``compare`` (:func:`compare_runs`, :func:`render_comparison`),
``watch --json`` (:func:`watch_snapshot`) and ``--version`` (:func:`version_line`). The
commands themselves are declared in :mod:`coordinator.run_control_cli`,
:mod:`coordinator.launch_cli` and :mod:`coordinator.cli`; the functions here take any client
with a ``call(method, path, body)`` method that returns the decoded JSON answer.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

__all__ = [
    "FINAL_STATUSES",
    "WAIT_EXIT_CODES",
    "WAIT_EXIT_HELP",
    "WAIT_TIMED_OUT",
    "Api",
    "compare_runs",
    "relaunch_body",
    "render_comparison",
    "version_line",
    "wait_for_run",
    "watch_snapshot",
]

FINAL_STATUSES: Final = frozenset({"completed", "failed", "stopped", "cancelled"})
# Exit codes of `fedward-coordinator wait`: 1 is any error (API unreachable, unknown run,
# no permission) and 2 a usage error (typer), so the outcomes start at 3.
WAIT_EXIT_CODES: Final = {"completed": 0, "failed": 3, "cancelled": 4, "stopped": 5}
WAIT_TIMED_OUT: Final = 6
WAIT_EXIT_HELP: Final = {
    0: "the run completed",
    1: "the command could not ask (API unreachable, unknown run, bad or missing token)",
    2: "usage error (a bad option)",
    3: "the run failed (its failure reason is printed)",
    4: "the run was cancelled (who and why are printed)",
    5: "the run's Flower run was stopped outside the coordinator",
    WAIT_TIMED_OUT: "--timeout passed while the run was still pending or running",
}
# The metrics compared per round (mean over the sites that reported them) and their labels.
_ROUND_METRICS: Final = (("eval-accuracy", "acc"), ("eval-auc", "auc"),
                         ("eval-loss", "loss"), ("epsilon-spent", "eps"))


class Api(Protocol):
    """The REST client of the CLI (``coordinator.cli_client.ApiClient``)."""

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request; return the decoded JSON answer (exits on an error)."""
        ...


def version_line(program: str) -> str:
    """``PROGRAM VERSION (commit REVISION)`` of the installed fedward
    (:func:`fedward.version_line`)."""
    import fedward

    return fedward.version_line(program)


def wait_for_run(api: Api, run_id: int, *, timeout: float, interval: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> tuple[int, dict[str, Any]]:
    """Poll a run until it ends or ``timeout`` passes.

    Args:
        api: The REST client.
        run_id: The run.
        timeout: Seconds to wait at most.
        interval: Seconds between polls.
        clock: Monotonic seconds (tests).
        sleep: Sleeps (tests).

    Returns:
        The exit code (:data:`WAIT_EXIT_CODES`, :data:`WAIT_TIMED_OUT`) and the run as last
        read.
    """
    deadline = clock() + timeout
    while True:
        run: dict[str, Any] = api.call("GET", f"/runs/{run_id}")
        if run["status"] in WAIT_EXIT_CODES:
            return WAIT_EXIT_CODES[run["status"]], run
        if clock() >= deadline:
            return WAIT_TIMED_OUT, run
        sleep(max(0.0, min(interval, deadline - clock())))


def relaunch_body(run: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The ``POST /runs`` body that launches a recorded run again.

    Every setting comes from the run's recorded configuration (its resolved learning rate,
    batch size and sites included), then ``overrides`` replace what was given.

    Args:
        run: The run as ``GET /runs/{id}`` answers it.
        overrides: Run request fields set on the command line.

    Returns:
        The request body.
    """
    config = dict(run["config"])
    config.pop("study_hash", None)   # the coordinator pins it again from the study version
    for key in ("model_plugin", "model_plugin_version", "model_plugin_sha256"):
        config.pop(key, None)        # so is the plugin, from what is installed then
    # A tuning trial launched again is an ordinary run, charged as one (not covered).
    config.pop("tuning_search", None)
    study = config.pop("study", None)
    body: dict[str, Any] = {"project": run["project"], **config}
    # A run of a study is launched again from the same study version (it names the task
    # or the study, never both); a --task or --study given replaces it.
    if study and "task" not in overrides:
        body["study"] = study
    else:
        body["task"] = run["task"]
    body.update(overrides)
    if "study" in overrides:
        body.pop("task", None)
    return body


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _per_round(metrics: Mapping[str, Any]) -> tuple[dict[int, dict[str, float | None]],
                                                     dict[str, float | None]]:
    """Per round: the mean over sites of each compared metric; and the final metrics."""
    rounds: dict[int, dict[str, float | None]] = {}
    final_values: dict[str, list[float]] = {}
    for entry in metrics.get("rounds", []):
        sites: Mapping[str, Mapping[str, float]] = entry.get("sites", {})
        rounds[int(entry["round"])] = {
            name: _mean([float(s[name]) for s in sites.values() if name in s])
            for name, _label in _ROUND_METRICS}
        for values in sites.values():
            for name, value in values.items():
                if name.startswith("final-"):
                    final_values.setdefault(name, []).append(float(value))
    return rounds, {name: _mean(vals) for name, vals in sorted(final_values.items())}


def compare_runs(a: Mapping[str, Any], a_metrics: Mapping[str, Any],
                 b: Mapping[str, Any], b_metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Two runs side by side: their configuration differences and metrics.

    Args:
        a: Run A as ``GET /runs/{id}`` answers it.
        a_metrics: Run A's ``GET /runs/{id}/metrics``.
        b: Run B.
        b_metrics: Run B's metrics.

    Returns:
        ``runs`` (id, status, reason of each), ``config`` (only the settings that differ:
        ``{name: {"a": ..., "b": ...}}``), ``rounds`` (per round, the mean over the sites of
        accuracy, AUC and loss, and of the epsilon spent) and ``final`` (the final
        evaluation's metrics, mean over the sites).
    """
    conf_a = {"project": a["project"], "task": a["task"], **dict(a["config"])}
    conf_b = {"project": b["project"], "task": b["task"], **dict(b["config"])}
    config = {key: {"a": conf_a.get(key), "b": conf_b.get(key)}
              for key in sorted(set(conf_a) | set(conf_b)) if conf_a.get(key) != conf_b.get(key)}
    rounds_a, final_a = _per_round(a_metrics)
    rounds_b, final_b = _per_round(b_metrics)
    empty = {name: None for name, _ in _ROUND_METRICS}
    return {
        "runs": {side: {"id": r["id"], "status": r["status"], "reason": r.get("failure_reason")}
                 for side, r in (("a", a), ("b", b))},
        "config": config,
        "rounds": [{"round": n, "a": rounds_a.get(n, empty), "b": rounds_b.get(n, empty)}
                   for n in sorted(set(rounds_a) | set(rounds_b))],
        "final": {name: {"a": final_a.get(name), "b": final_b.get(name)}
                  for name in sorted(set(final_a) | set(final_b))},
    }


def _num(value: float | None, width: int) -> str:
    return ("-" if value is None else f"{value:.3f}").rjust(width)


def _text(value: Any, width: int) -> str:
    shown = json.dumps(value) if not isinstance(value, str) else value
    return shown if len(shown) <= width else shown[:width - 3] + "..."


def render_comparison(data: Mapping[str, Any], *, width: int = 80) -> str:
    """The comparison as plain text no wider than ``width`` columns (at least 60)."""
    width = max(60, width)
    a, b = data["runs"]["a"], data["runs"]["b"]
    lines = [f"A: run {a['id']} ({a['status']})   B: run {b['id']} ({b['status']})"[:width]]
    half = (width - 26) // 2
    lines += ["", "configuration" + ("" if data["config"] else ": identical")]
    for key, pair in data["config"].items():
        lines.append(f"  {_text(key, 22):<22} {_text(pair['a'], half):<{half}} "
                     f"{_text(pair['b'], half)}".rstrip())
    col = 8
    lines += ["", "per round (mean over sites)",
              "round".rjust(5) + "".join(f"{label + ' ' + side:>{col + 1}}"
                                         for _, label in _ROUND_METRICS for side in "AB")]
    for row in data["rounds"]:
        lines.append(str(row["round"]).rjust(5) + "".join(
            " " + _num(row[side][name], col) for name, _ in _ROUND_METRICS for side in "ab"))
    if data["final"]:
        lines += ["", "final evaluation (mean over sites)",
                  f"  {'metric':<30}{'A':>{col + 1}}{'B':>{col + 1}}{'B - A':>{col + 1}}"]
        for name, pair in data["final"].items():
            diff = (None if pair["a"] is None or pair["b"] is None
                    else pair["b"] - pair["a"])
            lines.append(f"  {_text(name, 30):<30} " + " ".join(
                _num(v, col) for v in (pair["a"], pair["b"], diff)))
    return "\n".join(line[:width] for line in lines)


def watch_snapshot(run: Mapping[str, Any], rounds: list[Any], metrics: Mapping[str, Any]
                   ) -> dict[str, Any]:
    """One ``watch --json`` update: the run, its rounds and its per-site metrics."""
    return {"run": dict(run), "rounds": list(rounds), "metrics": dict(metrics)}
