"""What a site may say about a failed task: the phase, the exception type and a scrubbed
message.

The coordinator's team has to act on a site's failure without phoning the hospital, but an
exception's text can quote data (a value that did not parse, a row, a file path that names
a patient). :func:`scrub` keeps the shape of the message and removes what could be data:
every quoted string, every number and every path (a path inside the site's data directory
becomes that directory's name, any other path ``<path>``). The full text stays in the site
agent's own log.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["MAX_MESSAGE", "failure_reason", "scrub"]

MAX_MESSAGE = 300

# Absolute POSIX or Windows paths, and relative ones with at least one separator.
_PATH = re.compile(r"(?:[A-Za-z]:[\\/]|[\\/]|\.{1,2}[\\/]|[\w.-]+[\\/])[^\s'\",;:()\[\]{}<>]*")
_PATH_START = re.compile(r"[A-Za-z]:[\\/]|[\\/]|\.{1,2}[\\/]")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
# A token that starts with a digit (a number, "64x30", a date), not a word with digits in it
# ("float32", "fc1").
_NUMBER = re.compile(r"(?<![\w.])[-+]?\.?\d[\w.+-]*")


def _path_token(text: str, data_dir: Path | None) -> str:
    if data_dir is not None:
        try:
            Path(text).resolve().relative_to(data_dir.resolve())
            return f"<{data_dir.name}>"
        except (ValueError, OSError):
            pass
    return "<path>"


def scrub(message: str, *, data_dir: Path | None = None) -> str:
    """The first line of ``message`` without quoted strings, numbers or paths.

    Args:
        message: an exception's text.
        data_dir: the site's data directory: paths inside it are named by its name only.
    """
    lines = [line for line in message.strip().splitlines() if line.strip()]
    text = lines[0].strip() if lines else ""

    def quoted(match: re.Match[str]) -> str:
        inner = match.group(0)[1:-1]
        if _PATH.fullmatch(inner) or _PATH_START.match(inner):   # a quoted path, spaces too
            return _path_token(inner, data_dir)
        return "<text>"

    text = _QUOTED.sub(quoted, text)
    text = _PATH.sub(lambda m: _path_token(m.group(0), data_dir), text)
    text = _NUMBER.sub("<n>", text)
    if len(text) > MAX_MESSAGE:
        text = text[:MAX_MESSAGE - 3] + "..."
    return text


def failure_reason(err: BaseException, *, kind: str, phase: str,
                   data_dir: Path | None = None) -> str:
    """The reason a failed task's error reply gives: type, task kind, phase, scrubbed text.

    The coordinator reads the phase back from the ``phase <name>`` part.
    """
    message = scrub(str(err), data_dir=data_dir)
    return (f"task-failed: {type(err).__name__} during {kind or 'task'} (phase {phase})"
            + (f": {message}" if message else ""))
