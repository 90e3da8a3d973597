"""Names the MLflow hand-off shares: tag keys, metric keys, and checks of the settings.

Kept free of the MLflow client so that the settings, the ServerApp and the REST API can use
these names without importing MLflow (which only the process that exports imports).
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit

__all__ = [
    "TAG_APPROVED_AT",
    "TAG_COORDINATOR",
    "TAG_PROJECT",
    "TAG_RELEASE",
    "TAG_REVOKED",
    "TAG_RUN",
    "check_alias",
    "check_name_template",
    "check_tracking_uri",
    "metric_key",
    "project_name",
]

# Tags that link an MLflow run or model version back to the coordinator and its records.
# A run is found again by (coordinator, run) and a model version by (coordinator, release):
# that is what makes a repeated export update instead of duplicate.
TAG_COORDINATOR: Final = "fedward.coordinator_id"
TAG_RUN: Final = "fedward.run_id"
TAG_PROJECT: Final = "fedward.project"
TAG_RELEASE: Final = "fedward.release_id"
TAG_APPROVED_AT: Final = "fedward.approved_at"
TAG_REVOKED: Final = "fedward.revoked"

_ALIAS: Final = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_VERSION_ALIAS: Final = re.compile(r"^[vV]\d+$")
# MLflow accepts letters, digits, "_", "-", ".", " ", ":" and "/" in metric keys.
_METRIC_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_.\- ]")


def check_tracking_uri(value: str) -> str:
    """Accept an ``http(s)://host[:port][/path]`` tracking server URI.

    Other MLflow URI kinds (``file:``, ``sqlite:``, ``databricks``) would make the
    coordinator write files or reach services on its own behalf: the hand-off only talks to
    a tracking server.

    Args:
        value: The URI as given.

    Returns:
        The URI without surrounding blanks or a trailing slash.

    Raises:
        ValueError: Not an http(s) URI with a host, or it carries credentials.
    """
    uri = value.strip().rstrip("/")
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"MLflow tracking URI {value!r} is not an http(s)://host:port URI of "
                         "a tracking server (start one with `mlflow server`)")
    if parts.username or parts.password:
        raise ValueError("put no credentials into the MLflow tracking URI: set "
                         "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD instead")
    if parts.query or parts.fragment:
        raise ValueError(f"MLflow tracking URI {value!r} must not have a query or fragment")
    return uri


def check_name_template(value: str) -> str:
    """Accept an experiment or model name template whose only placeholder is ``{project}``.

    Args:
        value: The template, such as ``fedward-{project}``.

    Returns:
        The template.

    Raises:
        ValueError: Another placeholder, unbalanced braces, ``/`` or ``:`` (MLflow refuses
            them in model names), or an empty name.
    """
    try:
        rendered = value.format(project="p")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"name template {value!r}: the only placeholder allowed is "
                         f"{{project}} ({err})") from None
    if not rendered.strip() or "/" in rendered or ":" in rendered:
        raise ValueError(f"name template {value!r} must give a non-empty name without '/' "
                         "or ':'")
    return value


def check_alias(value: str) -> str:
    """Accept an MLflow registered-model alias (letters, digits, ``_``, ``-``).

    Args:
        value: The alias, such as ``approved``.

    Returns:
        The alias.

    Raises:
        ValueError: Bad characters, or a name MLflow reserves (``latest``, ``v<digits>``).
    """
    if not _ALIAS.fullmatch(value):
        raise ValueError(f"MLflow alias {value!r} may only contain letters, digits, '_' and "
                         "'-' (1-255 characters)")
    if value.lower() == "latest" or _VERSION_ALIAS.fullmatch(value):
        raise ValueError(f"MLflow reserves the alias {value!r}; choose another, such as "
                         "'approved'")
    return value


def project_name(template: str, project: str) -> str:
    """The experiment or model name of ``project`` from a checked template."""
    return template.format(project=project)


def metric_key(*parts: str) -> str:
    """An MLflow metric key from its parts (``site``, the site, the metric), joined by '.'.

    Site and metric names are already restricted to safe characters by the coordinator;
    anything MLflow would refuse is replaced by ``_`` all the same.
    """
    return ".".join(_METRIC_UNSAFE.sub("_", p) for p in parts)
