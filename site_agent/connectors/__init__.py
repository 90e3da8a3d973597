"""Data connectors: where a site's rows come from (CSV, Parquet, SQL, plugins).

The site's configuration names one in its ``data`` block (``site.json``)::

    "data": {"connector": "parquet", "path": "extract.parquet"}

Without a ``data`` block the site reads its ``data_path`` as CSV, as before. The built-in
connectors are registered here; another package adds one through the entry-point group
``fedward.connectors``, naming a :class:`Connector` subclass::

    [project.entry-points."fedward.connectors"]
    fhir = "my_package.fhir_connector:FhirConnector"

Entry points are looked up when a name is not built in; a plugin may not take a built-in
name. Only packages installed on the site's host are loaded, never code from the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from site_agent.connectors.base import Connector, ConnectorError, ConnectorOptions
from site_agent.connectors.files import CsvConnector, ParquetConnector
from site_agent.connectors.sql import SqlConnector

__all__ = [
    "BUILTIN_CONNECTORS",
    "ENTRY_POINT_GROUP",
    "Connector",
    "ConnectorError",
    "ConnectorOptions",
    "connector_class",
    "known_connectors",
    "open_connector",
]

ENTRY_POINT_GROUP: Final = "fedward.connectors"
BUILTIN_CONNECTORS: Final[Mapping[str, type[Connector]]] = {
    c.kind: c for c in (CsvConnector, ParquetConnector, SqlConnector)}


def _plugins() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN_CONNECTORS:
            raise ConnectorError([f"the connector plugin {ep.value!r} takes the built-in "
                                  f"name {ep.name!r}; rename it in that package's entry "
                                  "points"])
        found[ep.name] = ep
    return found


def known_connectors() -> list[str]:
    """Every connector kind :func:`connector_class` accepts, sorted."""
    return sorted({*BUILTIN_CONNECTORS, *_plugins()})


def connector_class(kind: str) -> type[Connector]:
    """The connector registered as ``kind`` (built in, else an installed plugin).

    Raises:
        ConnectorError: No such connector, or a plugin that is not a Connector.
    """
    if kind in BUILTIN_CONNECTORS:
        return BUILTIN_CONNECTORS[kind]
    plugins = _plugins()
    if kind not in plugins:
        raise ConnectorError([f"no data connector named {kind!r} (installed: "
                              f"{', '.join(known_connectors())}); install the package that "
                              "provides it, or fix 'connector'"])
    try:
        cls = plugins[kind].load()
    except Exception as exc:  # a plugin that fails to import: say which and why
        raise ConnectorError([f"the connector plugin {kind!r} ({plugins[kind].value}) "
                              f"cannot be loaded: {type(exc).__name__}: {exc}"]) from None
    if not (isinstance(cls, type) and issubclass(cls, Connector)):
        raise ConnectorError([f"the connector plugin {kind!r} ({plugins[kind].value}) is "
                              "not a site_agent.connectors.Connector subclass"])
    return cls


def open_connector(options: Mapping[str, Any], *, root: Path,
                   source: str = "data connector") -> Connector:
    """Build the connector a ``data`` block names, its options validated.

    Args:
        options: ``{"connector": KIND, ...its options}``.
        root: The site's data directory (relative paths are relative to it).
        source: How to name the block in messages.

    Returns:
        The connector (nothing is read yet).

    Raises:
        ConnectorError: Every problem of the block at once.
    """
    kind = options.get("connector")
    if not isinstance(kind, str) or not kind:
        raise ConnectorError([f"'connector' is required (one of: "
                              f"{', '.join(known_connectors())})"], source=source)
    cls = connector_class(kind)
    rest = {k: v for k, v in options.items() if k != "connector"}
    try:
        validated = cls.Options.model_validate(rest)
    except ValidationError as err:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or kind}: "
                    f"{str(e['msg']).removeprefix('Value error, ')}"
                    for e in err.errors(include_url=False, include_input=False)]
        raise ConnectorError(problems, source=f"{source} ({kind})") from None
    return cls(validated, root=root)
