"""The environment of every Flower process the appliance starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["flower_env"]


def flower_env(flwr_home: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for every Flower process the appliance starts.

    Telemetry and update checks are off (the appliance runs offline and must not phone
    home), ``FLWR_HOME`` is a folder the appliance owns, and the interpreter's ``bin``
    folder comes first on ``PATH`` because Flower starts its helpers (``flower-superexec``,
    ``flwr-serverapp``, ``flwr-clientapp``) by name.
    """
    env = dict(os.environ if base is None else base)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_HOME"] = flwr_home
    env["PYTHONUNBUFFERED"] = "1"
    # SuperExec polls for ServerApp tasks every 1.0 s by default, which a run's start waits
    # on once. A documented Flower knob. Each poll costs the SuperLink a request, idle or
    # not (a tenth of the SuperLink's CPU at 0.1 s, with the SuperLink the busiest process
    # of a small federation); 0.5 s starts a run at most 0.5 s later.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5")
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env
