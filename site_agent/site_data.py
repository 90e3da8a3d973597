"""The site's data as its configuration names it: a connector, then a schema or a study.

``site.json`` names where the rows come from (``data``: a connector; or ``data_path``: a
CSV file) and what they are checked against: a schema (``schema_path``, the original path,
unchanged) or a study with the hospital's mapping to it (``study`` + ``mapping``). The
agent and ``fedward-site check`` go through here, so they read the same data the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from site_agent.config import ConfigError, SiteConfig
from site_agent.connectors import Connector, ConnectorError
from site_agent.data import SiteData
from site_agent.data_report import DataReport
from site_agent.data_schema import DataSchema, load_schema
from site_agent.mapping import Binding

if TYPE_CHECKING:
    from fedward.tasks import TaskSpec

__all__ = ["ConfiguredData", "open_configured"]


@dataclass(frozen=True)
class ConfiguredData:
    """What the configuration names, opened and validated (no row read yet).

    Attributes:
        task: The registry task trained on (the schema's task, or the study's name).
        connector: Where the rows come from.
        schema: The schema, on the schema path.
        binding: The study and the mapping, on the study path.
    """

    task: str
    connector: Connector
    schema: DataSchema | None = None
    binding: Binding | None = None

    def check(self) -> DataReport:
        """Every problem of the data at once (the schema check, or the mapping check)."""
        if self.binding is not None:
            from site_agent.mapping_apply import check_mapping

            return check_mapping(self.binding, self.connector).report
        assert self.schema is not None
        return self.connector.check(self.schema)

    def load(self, *, fingerprint_key: bytes | None = None) -> SiteData:
        """Check and load the data as train and held-out arrays.

        Raises:
            DataCheckError: Every problem of the check.
        """
        if self.binding is not None:
            from site_agent.mapping_apply import load_study_data

            return load_study_data(self.binding, self.connector,
                                   fingerprint_key=fingerprint_key)
        assert self.schema is not None
        return self.connector.load(self.schema, fingerprint_key=fingerprint_key)

    def require_trainable(self) -> None:
        """Refuse a study this release cannot train (a shipped task's name with another
        model); any study can be checked and shown. A plugin model is not looked up here:
        each run pins its distribution, and the site's admission answer says whether it is
        installed and allowed (:func:`fedward.plugins.plugin_refusal`).

        Raises:
            ConfigError: Naming the study and why.
        """
        self.study_task()

    def study_task(self) -> TaskSpec | None:
        """The model this site trains for its study, built from the site's own copy of the
        spec (the coordinator's runs pin its hash); None on the schema path.

        Raises:
            ConfigError: The study cannot be trained by this release.
        """
        if self.binding is None:
            return None
        from fedward.tasks import UntrainableStudyError, study_task

        try:
            return study_task(self.binding.study)
        except UntrainableStudyError as err:
            raise ConfigError(f"{err} (`fedward-site mapping check` still checks the "
                              "data against it)") from None


def open_configured(config: SiteConfig, root: Path) -> ConfiguredData:
    """Open the connector and the schema, or the study and the mapping, ``config`` names.

    Raises:
        ConfigError: The connector, the study or the mapping is invalid (every problem).
        SchemaError: The schema is invalid.
    """
    try:
        connector = config.connector(root)
    except ConnectorError as err:
        raise ConfigError(str(err)) from None
    if config.study is None or config.mapping is None:
        schema = load_schema(config.resolve(root, config.schema_path))
        return ConfiguredData(task=schema.task, connector=connector, schema=schema)
    from fedward.study import StudyError
    from site_agent.mapping import MappingError, load_mapping, resolve_study

    try:
        binding = Binding(study=resolve_study(config.study, root=root),
                          mapping=load_mapping(config.resolve(root, config.mapping)))
    except (StudyError, MappingError) as err:
        raise ConfigError(str(err)) from None
    return ConfiguredData(task=binding.study.name, connector=connector, binding=binding)
