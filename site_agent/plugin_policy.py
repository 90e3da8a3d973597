"""The ``plugins`` section of a site's policy: the model plugins the site lets runs use.

Hospital IT lists, in ``policy.json``, each model plugin distribution it has installed and
accepts, exactly::

    "plugins": [{"distribution": "fedward-example-model", "version": "0.1.0",
                 "sha256": "<SHA-256 of its installed dist-info RECORD file>"}]

A run whose study's model is a plugin pins the distribution, version and hash the
coordinator has installed (:class:`fedward.plugins.PluginPin`); the site trains it only
when the same is installed here and listed here (:func:`fedward.plugins.plugin_refusal`).
No section, or an empty list: no plugin model is accepted. ``fedward-site policy
allow-plugin DIST`` adds the installed distribution's entry.
"""

from __future__ import annotations

import re
from typing import Any, Final

from fedward.plugins import PluginPin, normalize

__all__ = ["plugin_policy_problems", "plugins_from_raw", "plugins_to_raw"]

_KEYS: Final = ("distribution", "version", "sha256")
_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SHA256: Final = re.compile(r"^[0-9a-f]{64}$")
_VERSION: Final = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+!_-]{0,63}$")


def plugin_policy_problems(raw: object) -> list[str]:
    """Every problem of a ``plugins`` section (None: absent, which is sound)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        return [f"plugins is {raw!r}, expected a list of {{\"distribution\", \"version\", "
                "\"sha256\"}} (`fedward-site policy allow-plugin DIST` adds one)"]
    problems: list[str] = []
    seen: dict[tuple[str, str], int] = {}
    for i, entry in enumerate(raw):
        where = f"plugins[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where} must be an object with distribution, version and sha256")
            continue
        extra = sorted(set(entry) - set(_KEYS))
        if extra:
            problems.append(f"{where}: unknown keys {extra} (known: {list(_KEYS)})")
        missing = [k for k in _KEYS if k not in entry]
        if missing:
            problems.append(f"{where}: required keys missing: {missing}")
        name, version, digest = (entry.get(k) for k in _KEYS)
        if "distribution" in entry and not (isinstance(name, str) and _NAME.match(name)):
            problems.append(f"{where}: distribution {name!r} is not a distribution name")
        if "version" in entry and not (isinstance(version, str) and _VERSION.match(version)):
            problems.append(f"{where}: version {version!r} is not a version (a string, e.g. "
                            "\"0.1.0\")")
        if "sha256" in entry and not (isinstance(digest, str) and _SHA256.match(digest)):
            problems.append(f"{where}: sha256 {digest!r} is not a SHA-256 (64 lowercase hex "
                            "digits)")
        if isinstance(name, str) and isinstance(version, str):
            key = (normalize(name), version)
            if key in seen:
                problems.append(f"{where}: {name} {version} is listed twice (also "
                                f"plugins[{seen[key]}])")
            seen.setdefault(key, i)
    return problems


def plugins_from_raw(raw: object) -> tuple[PluginPin, ...]:
    """The pins of a section that :func:`plugin_policy_problems` found sound."""
    if not isinstance(raw, list):
        return ()
    return tuple(PluginPin(str(e["distribution"]), str(e["version"]), str(e["sha256"]))
                 for e in raw)


def plugins_to_raw(pins: tuple[PluginPin, ...]) -> list[dict[str, Any]]:
    """The section as written to ``policy.json``."""
    return [{"distribution": p.distribution, "version": p.version, "sha256": p.sha256}
            for p in pins]
