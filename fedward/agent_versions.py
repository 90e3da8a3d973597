"""The versions a site agent reports to the coordinator: Fedward's and Flower's.

A site sends ``{"fedward": "1.4.0", "flower": "1.42.0"}`` with its enrollment and renewal
requests and in its answer to each run's admission question (part :data:`REPLY_VERSIONS`).
Both ends check the same strict format (:func:`parse_versions`): a version is at most
:data:`MAX_LEN` characters of ASCII letters, digits, ``.``, ``+`` and ``-``, starting with a
digit (PEP 440 and setuptools-scm versions such as ``0.1.dev12+g3f2a9c1.d20261207`` fit).
Nothing else rides in it: no spaces, quotes or markup, so no free text from a site reaches a
page, a log or a table through this channel.

Reading the versions imports neither Flower nor torch (package metadata only).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Final

__all__ = ["MAX_LEN", "REPLY_VERSIONS", "VERSION_KEYS", "VersionFormatError", "local_versions",
           "parse_versions"]

# The name of the reply part (a ConfigRecord) that carries them in an admission answer.
REPLY_VERSIONS: Final = "versions"
# Component -> the distribution whose version it reports.
VERSION_KEYS: Final = {"fedward": "fedward", "flower": "flwr"}
MAX_LEN: Final = 64
_FORMAT: Final = re.compile(r"[0-9][0-9A-Za-z.+\-]{0," + str(MAX_LEN - 1) + "}")


class VersionFormatError(ValueError):
    """Reported versions that are not in the fixed format; the message lists every problem."""


def local_versions() -> dict[str, str]:
    """This installation's versions, as a site reports them.

    Read once per process: the code running is the code that was imported, even if a newer
    release is installed beside it meanwhile (it reports its versions after a restart).

    Returns:
        Component (``fedward``, ``flower``) -> version; a component whose distribution is
        not installed (or whose version is not in the format) is left out.
    """
    return dict(_read_versions())


@functools.cache
def _read_versions() -> tuple[tuple[str, str], ...]:
    from fedward import __version__

    found: dict[str, str] = {}
    for key, dist in VERSION_KEYS.items():
        try:
            value = __version__ if key == "fedward" else version(dist)
        except PackageNotFoundError:
            continue
        if _FORMAT.fullmatch(value):
            found[key] = value
    return tuple(found.items())


def parse_versions(raw: object) -> dict[str, str]:
    """Check reported versions; every problem at once.

    Args:
        raw: What the site sent (``None``: it sent none, as agents before this release).

    Returns:
        Component -> version; empty when nothing was sent.

    Raises:
        VersionFormatError: Not a mapping of known components to versions in the format.
    """
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise VersionFormatError("versions must be an object such as "
                                 '{"fedward": "1.4.0", "flower": "1.42.0"}')
    problems: list[str] = []
    out: dict[str, str] = {}
    for key, value in raw.items():
        name = str(key)[:32]
        if key not in VERSION_KEYS:
            problems.append(f"unknown component {name!r} (known: "
                            f"{', '.join(sorted(VERSION_KEYS))})")
        elif not isinstance(value, str) or not _FORMAT.fullmatch(value):
            problems.append(f"the {name} version is not a version (at most {MAX_LEN} "
                            "letters, digits, '.', '+' or '-', starting with a digit)")
        else:
            out[str(key)] = value
    if problems:
        raise VersionFormatError("; ".join(problems))
    return out
