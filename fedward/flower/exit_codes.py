"""What a SuperNode's exit code means for hospital IT, and how the agent learns it.

Flower gives its real exit code only in the SuperNode's log: ``flwr_exit``
(``flwr/supercore/exit/exit.py``) maps every code of 100 and above to process status 1 and
logs ``Exit Code: <code>`` first. The code is not passed to any hook (exit handlers take no
argument) and telemetry, which carries it, is off on the appliance. So the agent reads it
from the log the SuperNode wrote since it started (:func:`flower_exit_code`);
``tests/test_flower_canaries.py`` runs a real SuperNode against a SuperLink that refuses it
and checks the code read is 305.

Light on purpose: no flwr import (the values are checked against Flower's ``ExitCode`` by
the canary tests).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

from fedward.sandbox.netns import EXIT_NO_SANDBOX

__all__ = [
    "FATAL_EXIT_CODES",
    "NODE_AUTH_KEY_INVALID",
    "NODE_CONNECTION_REFUSED",
    "NODE_WITHOUT_TLS",
    "RUNTIME_VERSION_INCOMPATIBLE",
    "SUPERNODE_EXIT_HELP",
    "flower_exit_code",
    "reconnect_delays",
]

# Flower's ExitCode values the agent acts on (flwr.supercore.exit.exit_code.ExitCode).
NODE_AUTH_KEY_INVALID: Final = 302         # SUPERNODE_NODE_AUTH_KEY_INVALID
NODE_WITHOUT_TLS: Final = 303              # SUPERNODE_STARTED_WITHOUT_TLS_BUT_NODE_AUTH_ENABLED
NODE_CONNECTION_REFUSED: Final = 305       # SUPERNODE_CONNECTION_ERROR
RUNTIME_VERSION_INCOMPATIBLE: Final = 606  # RUNTIME_VERSION_INCOMPATIBLE

# What a SuperNode exit code means for hospital IT, and what to do about it.
SUPERNODE_EXIT_HELP: Final[dict[int, str]] = {
    NODE_AUTH_KEY_INVALID: (
        "the site's node key file cannot be read; re-create it with `fedward-site keygen`"),
    NODE_WITHOUT_TLS: "the coordinator address is configured without TLS; use the TLS address",
    NODE_CONNECTION_REFUSED: (
        "the coordinator refused the connection: either the site's node key is not "
        "registered (ask the ML team to run `fedward-coordinator add-site NAME "
        "--node-key node_key.pub`), or the node is still marked active after a restart "
        "(the agent retries after its back-off)"),
    RUNTIME_VERSION_INCOMPATIBLE: (
        "the coordinator runs another Flower version; update the site agent"),
    EXIT_NO_SANDBOX: "the SuperNode's private network namespace could not be made",
}

# Codes a restart cannot fix: the agent stops instead of retrying.
FATAL_EXIT_CODES: Final = frozenset({NODE_AUTH_KEY_INVALID, NODE_WITHOUT_TLS,
                                     RUNTIME_VERSION_INCOMPATIBLE, EXIT_NO_SANDBOX})

_EXIT_CODE_RE = re.compile(rb"Exit Code: (\d+)")
# What Flower's HTTP retry logs when a call to the SuperLink went through after retries
# (``flwr/supercore/retry/http_retry.py``): how long that call waited for the coordinator.
_RECONNECT_RE = re.compile(rb"Connection successful after (\d+(?:\.\d+)?) seconds")


def reconnect_delays(log_text: bytes) -> list[float]:
    """How long each call in a piece of SuperNode log waited for the coordinator to answer
    again (seconds), for calls that went through after being retried."""
    return [float(m) for m in _RECONNECT_RE.findall(log_text)]


def flower_exit_code(log_path: Path, process_status: int, *, since: int = 0) -> int:
    """Flower's own exit code for a SuperNode that ended.

    ``flwr_exit`` maps every code of 100 and above to process status 1 and writes the real
    code to the log ("Exit Code: 305"), so the log written since ``since`` is searched; the
    last code found wins, and without one the process status is the answer.
    """
    try:
        with log_path.open("rb") as fh:
            fh.seek(since)
            tail = fh.read()
    except OSError:
        return process_status
    found = _EXIT_CODE_RE.findall(tail)
    return int(found[-1]) if found else process_status
