"""Model plugins as installed distributions: which one provides a family, pinned by version
and hash, and whether a host has exactly that one.

A study whose model is a plugin (``model: {family: plugin, name: ENTRY_POINT, params:
{...}}``) trains the model family that an installed distribution registers under the
entry-point group ``fedward.models`` (:mod:`fedward.models`). No code travels in a run: the
coordinator and every site install the same distribution themselves. A run pins it
(:class:`PluginPin`): the distribution's name, its version and the SHA-256 of its
``*.dist-info/RECORD`` (below).

What is hashed (``sha256``): the distribution's installed ``*.dist-info/RECORD``, in a
normal form that does not depend on where or how it was installed. ``RECORD`` lists every
file the installer wrote with that file's own SHA-256 (PEP 376/627); the normal form keeps
each line that carries a hash, drops the installer's own notes (``INSTALLER``,
``REQUESTED``, ``direct_url.json``: the last holds the path the wheel was installed from)
and files outside the package's folder (scripts, ``../../bin/...``), and is the sorted
``PATH,sha256=DIGEST`` lines joined by newlines, each line ending with one. It is the same
for the wheel file itself (its own ``RECORD``, :func:`wheel_sha256`), so a hash can be read
before installing, and it stands for the whole installed content. Before a pin is read,
every installed file ``RECORD`` lists with a hash is checked against it, so a file edited
after installation is refused rather than pinned. An editable install (``pip install -e``)
lists only its path hook in ``RECORD``, not the source files: its pin says which version is
installed, not what its code is; a site installs wheels.

This module imports no torch.
"""

from __future__ import annotations

import base64
import csv
import email.parser
import hashlib
import re
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CONFIG_KEYS",
    "ENTRY_POINT_GROUP",
    "PluginError",
    "PluginPin",
    "distribution_pin",
    "installed_pin",
    "model_plugin_pin",
    "normalize",
    "plugin_refusal",
    "record_sha256",
    "wheel_sha256",
]

ENTRY_POINT_GROUP: Final = "fedward.models"
# The run configuration's fields (fedward.run_config.RunConfig) that hold a run's pin.
CONFIG_KEYS: Final = ("model_plugin", "model_plugin_version", "model_plugin_sha256")
_SHA256: Final = re.compile(r"^[0-9a-f]{64}$")


class PluginError(LookupError):
    """A model plugin that is not installed, or not as a pin can name it; says what to do."""


def normalize(name: str) -> str:
    """A distribution name as packaging compares it (PEP 503: case, ``-``, ``_``, ``.``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class PluginPin:
    """One installed distribution, exactly.

    Attributes:
        distribution: its name (as its metadata spells it).
        version: its version.
        sha256: SHA-256 (hex) of its ``*.dist-info/RECORD`` in the normal form
            (:func:`record_sha256`).
    """

    distribution: str
    version: str
    sha256: str

    def same(self, other: PluginPin) -> bool:
        """The same distribution (names compared normalised), version and hash."""
        return (normalize(self.distribution), self.version, self.sha256) == (
            normalize(other.distribution), other.version, other.sha256)

    def __str__(self) -> str:
        return f"{self.distribution}=={self.version} (RECORD sha256 {self.sha256})"

    def to_config(self) -> dict[str, str]:
        """The run configuration's fields (:data:`CONFIG_KEYS`)."""
        return dict(zip(CONFIG_KEYS, (self.distribution, self.version, self.sha256),
                        strict=True))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], keys: Iterable[str] = CONFIG_KEYS
                    ) -> PluginPin | None:
        """The pin in a run's configuration under ``keys`` (field names or wire keys);
        None when the run pins no plugin. A partial pin is incomplete: ``ValueError``."""
        values = [config.get(k) for k in keys]
        if all(v is None for v in values):
            return None
        if not all(isinstance(v, str) and v for v in values) or not _SHA256.match(
                str(values[2])):
            raise ValueError(f"the run's model plugin pin is incomplete or malformed: "
                             f"{dict(zip(keys, values, strict=True))}")
        return cls(*(str(v) for v in values))


_INSTALLER_NOTES: Final = frozenset({"INSTALLER", "REQUESTED", "direct_url.json"})


def record_sha256(record: str) -> str:
    """SHA-256 (hex) of a ``RECORD`` file's text in the normal form (module docstring)."""
    lines: set[str] = set()
    for row in csv.reader(record.splitlines()):
        if len(row) < 2 or not row[1].startswith("sha256="):
            continue
        path = row[0].replace("\\", "/")
        folder, _, name = path.rpartition("/")
        if path.startswith("../") or (folder.endswith(".dist-info")
                                     and name in _INSTALLER_NOTES):
            continue
        lines.add(f"{path},{row[1]}\n")
    return hashlib.sha256("".join(sorted(lines)).encode("utf-8")).hexdigest()


def wheel_sha256(wheel: Path) -> PluginPin:
    """The pin a wheel file will have once installed (read from its own ``RECORD``).

    Raises:
        PluginError: not a wheel (no single ``*.dist-info/RECORD`` or ``METADATA``).
    """
    try:
        with zipfile.ZipFile(wheel) as zf:
            records = [n for n in zf.namelist() if n.count("/") == 1
                       and n.endswith(".dist-info/RECORD")]
            if len(records) != 1:
                raise PluginError(f"{wheel} is not a wheel: it holds {len(records)} "
                                  "*.dist-info/RECORD files, not one")
            meta = email.parser.Parser().parsestr(zf.read(records[0].replace(
                "RECORD", "METADATA")).decode("utf-8"))
            record = zf.read(records[0]).decode("utf-8")
    except (OSError, zipfile.BadZipFile, KeyError, UnicodeDecodeError) as err:
        raise PluginError(f"{wheel} cannot be read as a wheel ({err})") from None
    return PluginPin(str(meta["Name"]), str(meta["Version"]), record_sha256(record))


def _record_file(dist: metadata.Distribution) -> metadata.PackagePath | None:
    for path in dist.files or ():
        if path.name == "RECORD" and path.parent.name.endswith(".dist-info"):
            return path
    return None


def _changed_files(dist: metadata.Distribution) -> list[str]:
    """The files ``RECORD`` lists with a hash whose content no longer matches it."""
    out: list[str] = []
    for path in dist.files or ():
        if path.hash is None or path.hash.mode != "sha256":
            continue  # RECORD itself and compiled files carry no hash
        try:
            data = Path(path.locate()).read_bytes()
        except OSError:
            out.append(f"{path} (missing)")
            continue
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        if digest.decode("ascii") != path.hash.value:
            out.append(str(path))
    return out


def distribution_pin(dist: metadata.Distribution) -> PluginPin:
    """Pin the installed ``dist`` (see the module docstring for what is hashed).

    Raises:
        PluginError: it has no ``RECORD`` (not installed by a standard installer), or a
            file it lists changed since it was installed.
    """
    name = str(dist.metadata["Name"])
    record = _record_file(dist)
    if record is None:
        raise PluginError(
            f"the installed distribution {name} {dist.version} has no dist-info RECORD "
            "file, so it cannot be pinned by hash; install it with pip from a wheel")
    changed = _changed_files(dist)
    if changed:
        raise PluginError(
            f"the installed distribution {name} {dist.version} differs from what was "
            f"installed ({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}); "
            f"reinstall it (pip install --force-reinstall {name}=={dist.version})")
    text = Path(record.locate()).read_text(encoding="utf-8")
    return PluginPin(name, dist.version, record_sha256(text))


def installed_pin(distribution: str) -> PluginPin | None:
    """The pin of the installed distribution of that name; None when none is installed."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    return distribution_pin(dist)


def _provider(entry_point: str) -> metadata.Distribution | None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == entry_point:
            return ep.dist
    return None


def model_plugin_pin(entry_point: str) -> PluginPin:
    """The pin of the distribution that provides the model family ``entry_point``.

    Raises:
        PluginError: no installed distribution provides it, or it cannot be pinned.
    """
    dist = _provider(entry_point)
    if dist is None:
        raise PluginError(
            f"no installed distribution provides the model plugin {entry_point!r} (entry "
            f"point group {ENTRY_POINT_GROUP!r}); install the ML team's package here")
    return distribution_pin(dist)


def plugin_refusal(*, site: str, pin: PluginPin, allowed: Iterable[PluginPin],
                   entry_point: str | None) -> str | None:
    """Why ``site`` cannot train a run that pins ``pin``; None when it can.

    The site must have exactly that distribution installed (name, version, RECORD hash),
    providing ``entry_point`` (the family its copy of the study names; None: not checked),
    and its policy must allow exactly it (``allowed``).
    """
    want = f"{pin.distribution}=={pin.version}"
    try:
        have = installed_pin(pin.distribution)
    except PluginError as err:
        return f"model plugin {want} cannot be used at site {site}: {err}"
    if have is None:
        return (f"model plugin distribution {pin.distribution} is missing at site {site}: "
                f"the run needs {want}; the site's IT installs it (pip install '{want}') and "
                "allows it in the policy's plugins")
    if have.version != pin.version:
        return (f"model plugin distribution {pin.distribution} is at version {have.version} "
                f"at site {site}, the run needs {pin.version}; the site's IT installs "
                f"'{want}'")
    if have.sha256 != pin.sha256:
        return (f"model plugin {want} installed at site {site} is another build (RECORD "
                f"sha256 {have.sha256}, the run pins {pin.sha256}); the site's IT installs "
                "the wheel the ML team published")
    if entry_point is not None:
        provider = _provider(entry_point)
        if provider is None or normalize(str(provider.metadata["Name"])) != normalize(
                pin.distribution):
            return (f"model plugin {want} at site {site} does not provide the model family "
                    f"{entry_point!r} that the site's study names")
    if not any(pin.same(a) for a in allowed):
        return (f"model plugin {pin} is not allowed by the policy of site {site}; its IT "
                "adds it to the policy's plugins (fedward-site policy allow-plugin "
                f"{pin.distribution})")
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m fedward.plugins WHEEL|DISTRIBUTION ...``: print each one's pin as the
    policy's ``plugins`` entry (a wheel file, or a distribution installed here)."""
    import json
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m fedward.plugins WHEEL_FILE|DISTRIBUTION ...", file=sys.stderr)
        return 2
    status = 0
    for arg in args:
        try:
            pin = wheel_sha256(Path(arg)) if arg.endswith(".whl") else installed_pin(arg)
        except PluginError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 1
            continue
        if pin is None:
            print(f"error: no distribution named {arg!r} is installed here", file=sys.stderr)
            status = 1
            continue
        print(json.dumps({"distribution": pin.distribution, "version": pin.version,
                          "sha256": pin.sha256}))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
