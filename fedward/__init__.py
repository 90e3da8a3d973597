"""Fedward's kernel: what the coordinator and the site agent share.

The wire protocol (:mod:`fedward.wire`), the task and model registry (:mod:`fedward.tasks`,
:mod:`fedward.models`), certificates, process and file helpers, the sandbox of the Flower
processes, and every touch of Flower's internals (:mod:`fedward.flower`). It imports
neither :mod:`coordinator` nor :mod:`site_agent`; importing ``fedward`` and its top-level
modules loads neither torch nor flwr (only :mod:`fedward.models` and :mod:`fedward.flower`
may).
"""

from __future__ import annotations

import importlib
import re
from typing import Any

__all__ = ["__version__", "code_revision", "version_line"]

_LOCAL_NODE = re.compile(r"\+g([0-9a-f]{7,40})(\.d\d{8})?$")


def _build_info() -> Any:
    """The version file setuptools-scm wrote at build time, or None (a source tree that was
    never built or installed)."""
    try:
        return importlib.import_module("fedward._version")
    except ImportError:
        return None


def _version() -> str:
    info = _build_info()
    return str(getattr(info, "version", "0+unknown"))


__version__ = _version()


def code_revision() -> str:
    """The git commit this fedward was built from, as recorded at build time.

    Returns:
        The commit's hash (all 40 digits), with ``+modified`` when the tree it was built
        from had uncommitted changes; ``unknown`` for a build without git metadata (an
        unpacked archive) or a source tree that was never built. Nothing here runs git: the
        answer comes from ``fedward/_version.py``, which setuptools-scm writes when the
        package is built or installed (an editable install records the commit it was
        installed at).
    """
    info = _build_info()
    if info is None:
        return "unknown"
    commit = getattr(info, "commit", None)
    dirty = bool(getattr(info, "dirty", False))
    if isinstance(commit, str) and re.fullmatch(r"g[0-9a-f]{40}", commit):
        node = commit[1:]
    else:
        # The local part of the version ("+g<hash>[.dYYYYMMDD]") names the commit, shortened.
        found = _LOCAL_NODE.search(str(getattr(info, "version", "")))
        if found is None:
            return "unknown"
        node, dirty = found.group(1), dirty or found.group(2) is not None
    return node + ("+modified" if dirty else "")


def version_line(program: str) -> str:
    """What ``PROGRAM --version`` prints: ``PROGRAM VERSION (commit REVISION)``.

    Every console script prints this line (``fedward-coordinator``, ``fedward-site``,
    ``fedward-demo``, ``fedward-verify``, ``fedward-serve``); it loads nothing beyond this
    module, so the clinician's install (no torch, no Flower) answers it too.
    """
    return f"{program} {__version__} (commit {code_revision()})"
